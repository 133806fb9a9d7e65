"""What both modes of ``b2txt evaluate`` share: its settings and the outcome of a trial and a run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..ground.config import DecodeConfig, RescoreConfig
from ..ground.device import available_cores
from .client import FinalResult
from .connection import PASSWORD_ENV, RedisAddress, TlsFiles


@dataclass(frozen=True)
class EvalSettings:
    logits: Path
    lm_dir: Path
    out: Path
    options: DecodeConfig = field(default_factory=DecodeConfig)
    rescore: RescoreConfig | None = None
    alpha: float = 0.55
    sessions: int | None = None  # None: 2 x workers; 0: the published default session only
    timeout: float = 60.0
    startup_timeout: float = 600.0
    max_attempts: int = 5
    chunk_frames: int | None = None
    run_dir: Path | None = None
    external: RedisAddress | None = None
    split: str | None = None
    max_restarts: int = 5
    server_log_level: str = "warning"
    workers: int | None = None
    # consumer-group mode (evaluate_group): whole trials shared by lm-worker processes
    group_workers: int = 0  # local lm-worker processes
    external_workers: bool = False  # workers started elsewhere take trials too (or only they do)
    queue: str = "b2txt:batch"
    claim_idle_ms: int = 60_000
    max_deliveries: int = 5
    window: int = 1024  # trials on the queue at once
    bind: str | None = None  # the private redis-server also listens on bind:port (for other hosts)
    port: int = 0
    tls: TlsFiles | None = None  # ... and speaks TLS there
    password_env: str = PASSWORD_ENV

    @property
    def n_workers(self) -> int:
        return self.workers or self.options.workers or available_cores()

    @property
    def group_mode(self) -> bool:
        return self.group_workers > 0 or self.external_workers



@dataclass
class TrialOutcome:
    result: FinalResult
    attempts: int
    seconds: float



@dataclass
class ModeRun:
    """What a mode hands back: one outcome per answered trial, the wall time, the restarts of the
    services it ran, and its own fields for evaluation.json."""

    outcomes: dict[int, TrialOutcome]
    seconds: float
    restarts: dict[str, int]
    fields: dict[str, Any] = field(default_factory=dict)
