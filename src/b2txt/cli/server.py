"""Server commands: ``lm-server``, ``lm-worker`` and ``evaluate`` (decoding through Redis).

``lm-server`` accepts the published ``language-model-standalone.py`` flags (underscore names,
same meaning) where they apply, so scripts written for it keep working; its own flags use
dashes. Option values not given on the command line come from the config file's ``decode``
and ``rescore`` sections (``--config``), else the built-in defaults.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ..ground.config import DecodeConfig, RescoreConfig
from ..ground.console import log
from ..ground.errors import B2txtError
from .common import PORT, Command, add_config, at_least, config_of, positive

#: Published flag -> our DecodeConfig field.
DECODE_FLAGS = {
    "max_active": "max_active", "min_active": "min_active", "beam": "beam", "lattice_beam": "lattice_beam",
    "acoustic_scale": "acoustic_scale", "ctc_blank_skip_threshold": "blank_skip_threshold",
    "length_penalty": "length_penalty", "nbest": "nbest", "blank_penalty": "blank_penalty",
    "top_candidates_to_augment": "augment_top", "score_penalty_percent": "augment_penalty",
    "decoder": "decoder", "beam_size_token": "beam_size_token",
}


def _add_config(p: argparse.ArgumentParser) -> None:
    add_config(p, "decode and rescore (their values are the defaults of the flags below), server")


def _add_decode_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoder options (published names; default: the config's decode section)")
    g.add_argument("--decoder", choices=["wfst", "lexicon"], help="wfst: TLG.fst + words.txt; lexicon: KenLM lm.bin/lm.arpa")
    g.add_argument("--max_active", type=at_least(1))
    g.add_argument("--min_active", type=at_least(0))
    g.add_argument("--beam", type=at_least(0, float, exclusive=True))
    g.add_argument("--lattice_beam", type=at_least(0, float, exclusive=True))
    g.add_argument("--acoustic_scale", type=float)
    g.add_argument("--ctc_blank_skip_threshold", type=float)
    g.add_argument("--length_penalty", type=float)
    g.add_argument("--nbest", type=at_least(1), help="candidates per trial (1: fastest, no scoring rows beyond the best)")
    g.add_argument("--blank_penalty", type=float, help="the blank's log-probability is lowered by log(blank_penalty)")
    g.add_argument("--top_candidates_to_augment", type=at_least(0))
    g.add_argument("--score_penalty_percent", type=float)
    g.add_argument("--beam_size_token", type=at_least(1), help="lexicon decoder: tokens tried per frame")
    g.add_argument("--rescore", action="store_true", default=None,
                   help="rescore the n-best with G_no_prune.fst (when the LM directory has it)")
    g.add_argument("--do_opt", action="store_true", default=None, help="rescore the n-best with the LLM")
    g.add_argument("--alpha", type=float, help="LLM weight in [0, 1] (default: rescore.alpha)")
    g.add_argument("--llm", metavar="NAME", help="LLM for --do_opt: Hub name or local directory (default: rescore.model)")
    g.add_argument("--opt_cache_dir", type=Path, help="Hugging Face cache directory for the LLM")
    g.add_argument("--gpu_number", type=at_least(0), help="LLM on cuda:N (default: rescore.device)")


def _add_redis_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Redis connection (default 127.0.0.1:6379; never a LAN address unless --allow-remote)")
    g.add_argument("--redis-socket", "--redis_socket", dest="redis_socket", type=Path, metavar="PATH",
                   help="Unix socket of the Redis server (preferred over TCP)")
    g.add_argument("--redis_ip", default="127.0.0.1", help="Redis host (loopback unless --allow-remote)")
    g.add_argument("--redis_port", type=PORT, default=6379)
    g.add_argument("--allow-remote", action="store_true", help="allow a non-loopback Redis host")
    g.add_argument("--password-env", default="B2TXT_REDIS_PASSWORD", metavar="NAME",
                   help="environment variable holding the Redis password (used when set)")


def decode_options(args: argparse.Namespace, base: DecodeConfig) -> DecodeConfig:
    """The config's decode section with the flags given on the command line applied (and validated)."""
    changes = {field: getattr(args, flag) for flag, field in DECODE_FLAGS.items()
               if getattr(args, flag, None) is not None}
    if getattr(args, "rescore", None):
        changes["rescore_unpruned"] = True
    if getattr(args, "workers", None):
        changes["workers"] = args.workers
    try:
        return DecodeConfig.model_validate({**base.model_dump(), **changes})
    except Exception as exc:  # pydantic ValidationError: one line per bad flag
        raise B2txtError(f"bad decoder option: {exc}") from None


def rescore_config(args: argparse.Namespace, base: RescoreConfig) -> tuple[RescoreConfig | None, float, bool]:
    """(LLM config when an LLM must be loaded, alpha, do_opt in force at start)."""
    alpha = args.alpha if args.alpha is not None else base.alpha
    if not 0 <= alpha <= 1:
        raise B2txtError(f"--alpha {alpha}: must be within [0, 1]")
    do_opt = bool(args.do_opt) or base.enabled
    changes: dict[str, Any] = {"alpha": alpha, "enabled": do_opt}
    if args.llm:
        changes["model"] = args.llm
    if args.gpu_number is not None:
        changes["device"] = f"cuda:{args.gpu_number}"
    if args.opt_cache_dir:
        os.environ["HF_HUB_CACHE"] = str(args.opt_cache_dir.expanduser())
    cfg = base.model_copy(update=changes)
    return (cfg if (do_opt or args.llm) else None), alpha, do_opt


def redis_address(args: argparse.Namespace) -> Any:
    from ..server.connection import RedisAddress, check_address

    if args.redis_socket:
        address = RedisAddress(socket=args.redis_socket, password_env=args.password_env)
    else:
        address = RedisAddress(host=args.redis_ip, port=args.redis_port, password_env=args.password_env)
    return check_address(address, allow_remote=args.allow_remote)


# ----------------------------------------------------------------------------- lm-server

def _lm_inputs(args: argparse.Namespace) -> tuple[Any, Any, Any, float, bool, Path]:
    """What lm-server and lm-worker both read: the config, the decode options, the LLM settings
    (llm, alpha, do_opt) and the checked LM directory."""
    cfg = config_of(args)
    options = decode_options(args, cfg.decode)
    llm, alpha, do_opt = rescore_config(args, cfg.rescore)
    lm_dir = Path(os.path.expanduser(str(args.lm_path)))
    if not lm_dir.is_dir():
        raise B2txtError(f"{lm_dir}: language model directory not found")
    return cfg, options, llm, alpha, do_opt, lm_dir


def server_settings(args: argparse.Namespace) -> Any:
    from ..ground.device import available_cores
    from ..server import protocol as P
    from ..server.lm_server import ServerSettings

    _, options, llm, alpha, do_opt, lm_dir = _lm_inputs(args)
    if args.trace is not None and (args.trace.is_dir() or not args.trace.parent.is_dir()):
        raise B2txtError(f"--trace {args.trace}: must be a file in an existing directory")
    for name, value in (("--workers", args.workers), ("--max-sessions", args.max_sessions),
                        ("--max-logits-bytes", args.max_logits_bytes), ("--max-trial-frames", args.max_trial_frames)):
        positive(name, value)
    return ServerSettings(
        lm_dir=lm_dir, address=redis_address(args),
        params=P.SessionParams(decode=options, alpha=alpha, do_opt=do_opt),
        workers=args.workers or options.workers or available_cores(), llm=llm,
        max_logits_bytes=args.max_logits_bytes, max_trial_frames=args.max_trial_frames,
        max_sessions=args.max_sessions, drain_timeout=args.drain_timeout, trace=args.trace,
        default_streams=P.Streams(input_name=args.input_stream, partial_name=args.partial_output_stream,
                                  final_name=args.final_output_stream))


def run_lm_server(args: argparse.Namespace) -> int:
    from ..server.router import serve

    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(processName)s: %(message)s", stream=sys.stderr)
    return serve(server_settings(args))


def add_lm_server_arguments(p: argparse.ArgumentParser) -> None:
    _add_config(p)
    p.add_argument("--lm_path", "--lm", dest="lm_path", type=Path, required=True, metavar="DIR",
                   help="language model directory: TLG.fst + words.txt (wfst), or lm.bin/lm.arpa (lexicon)")
    _add_decode_flags(p)
    _add_redis_flags(p)
    g = p.add_argument_group("server")
    g.add_argument("--workers", type=at_least(1), help="decoding processes (default: decode.workers, else all cores)")
    g.add_argument("--input_stream", default="remote_lm_input", help="default session's logits stream")
    g.add_argument("--partial_output_stream", default="remote_lm_output_partial")
    g.add_argument("--final_output_stream", default="remote_lm_output_final")
    g.add_argument("--max-logits-bytes", type=at_least(1), default=16 * 1024 * 1024, help="largest logits entry accepted")
    g.add_argument("--max-trial-frames", type=at_least(1), default=100_000, help="most frames one trial may accumulate")
    g.add_argument("--max-sessions", type=at_least(1), default=256, help="sessions (extension) held at once")
    g.add_argument("--drain-timeout", type=at_least(0, float), default=30.0,
                   help="after SIGTERM, seconds to let trials under way finish before exiting")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    g.add_argument("--trace", type=Path, metavar="FILE",
                   help="append one JSON line per request served: when each hop happened (router read, worker "
                        "received, decoded, replied; CLOCK_MONOTONIC ns), to see where the latency goes")


# ----------------------------------------------------------------------------- lm-worker

def tls_files(args: argparse.Namespace) -> Any:
    """The --tls-ca/--tls-cert/--tls-key files (checked), or None when none is given (and no --tls)."""
    from ..server.connection import TlsFiles

    if not (getattr(args, "tls", False) or args.tls_ca or args.tls_cert or args.tls_key):
        return None
    return TlsFiles(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key).check()


def worker_settings(args: argparse.Namespace) -> Any:
    from ..server import protocol as P
    from ..server.connection import RedisAddress, check_remote_password
    from ..server.lm_worker import WorkerSettings
    from ..server.trial_queue import check_queue_name

    cfg, options, llm, alpha, do_opt, lm_dir = _lm_inputs(args)
    positive("--max-logits-bytes", args.max_logits_bytes)
    positive("--max-deliveries", args.max_deliveries)
    claim = args.claim_idle_ms if args.claim_idle_ms is not None else cfg.server.claim_idle_ms
    if claim < 100:
        raise B2txtError(f"--claim-idle-ms {claim}: must be at least 100")
    if args.idle_exit is not None and args.idle_exit <= 0:
        raise B2txtError(f"--idle-exit {args.idle_exit}: must be positive")
    consumer = args.consumer or ""
    if consumer and (len(consumer) > 200 or any(c.isspace() for c in consumer)):
        raise B2txtError(f"--consumer {consumer!r}: use 1-200 characters without spaces")
    tls = tls_files(args)
    if args.redis_socket:
        if tls is not None:
            raise B2txtError("--tls-*: a Unix socket needs no TLS (use --redis-host and --redis-port)")
        address = RedisAddress(socket=args.redis_socket, password_env=args.password_env)
    else:
        address = RedisAddress(host=args.redis_host, port=args.redis_port, password_env=args.password_env, tls=tls)
    return WorkerSettings(
        lm_dir=lm_dir, address=check_remote_password(address),
        params=P.SessionParams(decode=options, alpha=alpha, do_opt=do_opt), llm=llm,
        queue=check_queue_name(args.queue), consumer=consumer, claim_idle_ms=claim,
        max_deliveries=args.max_deliveries if args.max_deliveries is not None else cfg.server.max_deliveries,
        max_logits_bytes=args.max_logits_bytes, connect_timeout=args.connect_timeout, idle_exit=args.idle_exit)


def run_lm_worker(args: argparse.Namespace) -> int:
    from ..server.lm_worker import run_worker

    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s lm-worker: %(message)s", stream=sys.stderr)
    return run_worker(worker_settings(args))


def _add_tls_flags(g: Any, what: str) -> None:
    g.add_argument("--tls-ca", type=Path, metavar="PEM", help=what.split("|")[0])
    g.add_argument("--tls-cert", type=Path, metavar="PEM", help=what.split("|")[1])
    g.add_argument("--tls-key", type=Path, metavar="PEM", help="the private key of --tls-cert")


def add_lm_worker_arguments(p: argparse.ArgumentParser) -> None:
    _add_config(p)
    p.add_argument("--lm_path", "--lm", dest="lm_path", type=Path, required=True, metavar="DIR",
                   help="language model directory on this host: TLG.fst + words.txt (wfst), or lm.bin/lm.arpa")
    _add_decode_flags(p)
    g = p.add_argument_group("Redis connection (a non-loopback host needs the password)")
    g.add_argument("--redis-socket", "--redis_socket", dest="redis_socket", type=Path, metavar="PATH",
                   help="Unix socket of the Redis server (same host)")
    g.add_argument("--redis-host", "--redis_ip", dest="redis_host", default="127.0.0.1", help="Redis host")
    g.add_argument("--redis-port", "--redis_port", dest="redis_port", type=PORT, default=6379)
    g.add_argument("--password-env", default="B2TXT_REDIS_PASSWORD", metavar="NAME",
                   help="environment variable holding the Redis password (never a command-line argument)")
    g.add_argument("--tls", action="store_true", help="connect with TLS (implied by the --tls-* files)")
    _add_tls_flags(g, "CA that signed the server's certificate (default: the system's CAs)|"
                      "client certificate, when the server asks for one")
    g.add_argument("--connect-timeout", type=at_least(0, float, exclusive=True), default=60.0,
                   help="seconds to keep trying while Redis is unreachable (at start and after a loss)")
    g = p.add_argument_group("worker")
    g.add_argument("--queue", default="b2txt:batch", help="stream prefix: trials on QUEUE:trials (the evaluator's --queue)")
    g.add_argument("--consumer", metavar="NAME", help="this worker's name in the consumer group (default: host:pid)")
    g.add_argument("--claim-idle-ms", type=at_least(1),
                   help="claim trials pending this long on another worker (XAUTOCLAIM; default: server.claim_idle_ms)")
    g.add_argument("--max-deliveries", type=at_least(1),
                   help="answer a trial handed out more often than this with an error (default: server.max_deliveries)")
    g.add_argument("--max-logits-bytes", type=at_least(1), default=64 * 1024 * 1024, help="largest logits entry accepted")
    g.add_argument("--idle-exit", type=at_least(0, float, exclusive=True), metavar="SECONDS", help="exit 0 after this long without a trial "
                                                                      "(default: run until SIGTERM)")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


# ----------------------------------------------------------------------------- evaluate

def group_options(args: argparse.Namespace, server: Any, external: Any) -> dict[str, Any]:
    """EvalSettings fields of the consumer-group mode, with one clear error per bad combination."""
    from ..server.connection import check_remote_password, require_password
    from ..server.trial_queue import check_queue_name

    group_workers = args.group_workers if args.group_workers is not None else server.group_workers
    if group_workers < 0:
        raise B2txtError(f"--group-workers {group_workers}: must be 0 or more")
    group = group_workers > 0 or args.external_workers
    network = args.bind is not None or args.port is not None
    tls = tls_files(args)
    if not group:
        if network or tls is not None:
            raise B2txtError("--bind, --port and --tls-*: only in the consumer-group mode "
                             "(--group-workers N or --external-workers)")
        return {}
    if args.chunk_frames is not None:
        raise B2txtError("--chunk-frames: the consumer-group mode sends whole trials (streaming needs the session mode)")
    if external is not None:
        if network:
            raise B2txtError("--bind/--port: with --server the workers connect to that Redis, not to a private one")
        check_remote_password(external)
        tls_server = None
    else:
        if args.port is not None and not 0 < args.port < 65536:
            raise B2txtError(f"--port {args.port}: out of range (1-65535)")
        if args.bind is not None and args.port is None:
            raise B2txtError(f"--bind {args.bind}: give the TCP port too (--port N)")
        if args.bind is not None:  # the one policy, checked before the logits are even read
            require_password(args.bind, args.password_env, f"--bind {args.bind}")
        if tls is not None and args.port is None:
            raise B2txtError("--tls-*: the private Redis speaks TLS on its TCP port: give --port (and --bind)")
        tls_server = tls
    for name, value in (("--claim-idle-ms", args.claim_idle_ms), ("--max-deliveries", args.max_deliveries),
                        ("--window", args.window)):
        positive(name, value)
    claim = args.claim_idle_ms if args.claim_idle_ms is not None else server.claim_idle_ms
    if claim < 100:
        raise B2txtError(f"--claim-idle-ms {claim}: must be at least 100")
    return {"group_workers": group_workers, "external_workers": bool(args.external_workers),
            "queue": check_queue_name(args.queue), "claim_idle_ms": claim,
            "max_deliveries": args.max_deliveries if args.max_deliveries is not None else server.max_deliveries,
            "window": args.window, "bind": args.bind if args.bind is not None else
            ("127.0.0.1" if args.port is not None else None),
            "port": args.port or 0, "tls": tls_server, "password_env": args.password_env}


def run_evaluate(args: argparse.Namespace) -> int:
    from ..server.evaluate import evaluate
    from ..server.evaluate_common import EvalSettings

    cfg = config_of(args)
    options = decode_options(args, cfg.decode)
    llm, alpha, do_opt = rescore_config(args, cfg.rescore)
    if args.no_rescore:
        llm, do_opt = None, False
    external = None
    if args.server:
        from dataclasses import replace

        from ..server.connection import RedisAddress, check_address

        external = check_address(RedisAddress.parse(args.server, args.password_env), allow_remote=args.allow_remote)
        if external.socket is None and tls_files(args) is not None:
            external = replace(external, tls=tls_files(args))
    server = cfg.server  # command-line flags win over the config's `server` section
    group = group_options(args, server, external)

    def pick(flag: str, field: str):
        value = getattr(args, flag)
        return getattr(server, field) if value is None else value

    settings = EvalSettings(
        logits=args.logits, lm_dir=args.lm_path, out=args.out, options=options,
        rescore=llm.model_copy(update={"enabled": do_opt}) if llm else None, alpha=alpha,
        sessions=pick("sessions", "sessions"), timeout=pick("timeout", "timeout"),
        startup_timeout=pick("startup_timeout", "startup_timeout"),
        max_attempts=pick("max_attempts", "max_attempts"), chunk_frames=pick("chunk_frames", "chunk_frames"),
        run_dir=args.run_dir, external=external, split=args.split, max_restarts=pick("max_restarts", "max_restarts"),
        server_log_level=args.server_log_level, **group)
    summary = evaluate(settings, log=log)
    log(f"{args.out}: {summary['n_trials']} trials in {summary['seconds']:.1f} s "
         f"({summary['trials_per_second']:.1f} trials/s); " +
         (f"WER {summary['WER']:.4f}" if summary.get("WER") is not None else "no labelled trials (no WER)"))
    return 0


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    _add_config(p)
    p.add_argument("--logits", type=Path, required=True, metavar="LOGITS_H5", help="logits file from `b2txt infer`")
    p.add_argument("--lm_path", "--lm", dest="lm_path", type=Path, required=True, metavar="DIR",
                   help="language model directory for the LM server")
    p.add_argument("--out", type=Path, required=True, metavar="OUT_DIR",
                   help="decoded.csv, nbest.jsonl, submission.csv, WER/PER tables (replaced atomically)")
    p.add_argument("--split", help="split name in the metrics (default: from the logits file)")
    _add_decode_flags(p)
    p.add_argument("--no-rescore", action="store_true", help="no LLM rescoring whatever the config says")
    p.add_argument("--workers", type=at_least(1), help="LM server processes (default: decode.workers, else all cores)")
    p.add_argument("--sessions", type=at_least(0), help="trials in flight at once (default: 2 x workers); 0: the published "
                                                "single-client protocol (one trial at a time)")
    p.add_argument("--timeout", type=at_least(0, float, exclusive=True), help="seconds to wait for one reply before re-sending the trial "
                                                 "(default: server.timeout, 60)")
    p.add_argument("--startup-timeout", type=at_least(0, float, exclusive=True),
                   help="seconds to wait for the LM server to load its graph and answer")
    p.add_argument("--max-attempts", type=at_least(1), help="sends of one trial before giving up (default: server.max_attempts)")
    p.add_argument("--max-restarts", type=at_least(0),
                   help="restarts of redis-server / the LM server before giving up (default: server.max_restarts)")
    p.add_argument("--chunk-frames", type=at_least(1), help="send each trial in chunks of N frames (streaming; default: whole)")
    p.add_argument("--run-dir", type=Path, help="where the private redis-server's socket and the logs go "
                                                "(default: a new temporary directory, removed afterwards)")
    p.add_argument("--server", metavar="ADDRESS", help="use the LM server behind this Redis (unix:PATH, PATH, "
                                                       "HOST:PORT) instead of starting redis-server and an LM server")
    p.add_argument("--allow-remote", action="store_true", help="with --server: allow a non-loopback host")
    p.add_argument("--password-env", default="B2TXT_REDIS_PASSWORD", metavar="NAME",
                   help="environment variable holding the Redis password (used when set)")
    p.add_argument("--server-log-level", default="warning", choices=["debug", "info", "warning", "error"])
    g = p.add_argument_group(
        "consumer-group mode (whole trials on a Redis stream, decoded by `b2txt lm-worker` processes on any host)")
    g.add_argument("--group-workers", type=at_least(0), metavar="N",
                   help="start N local lm-worker processes and share the trials through a consumer group "
                        "(default: server.group_workers; 0: the session mode above)")
    g.add_argument("--external-workers", action="store_true",
                   help="workers started elsewhere take trials too (with --group-workers 0: only they do); "
                        "the private Redis listens on --bind/--port for them, or give --server")
    g.add_argument("--queue", default="b2txt:batch", help="stream prefix (the workers' --queue)")
    g.add_argument("--bind", metavar="ADDRESS", help="the private redis-server also listens on this address "
                   "(a non-loopback one only with a password: see --password-env)")
    g.add_argument("--port", type=PORT, help="... and this TCP port (default address: 127.0.0.1)")
    _add_tls_flags(g, "private Redis: CA whose client certificates it requires; with --server: the CA that signed "
                      "the server's certificate|private Redis: its certificate (TLS only on --port); "
                      "with --server: this client's certificate")
    g.add_argument("--claim-idle-ms", type=at_least(1), help="a trial pending this long on a worker is claimed by another "
                                                     "(default: server.claim_idle_ms)")
    g.add_argument("--max-deliveries", type=at_least(1), help="fail a trial handed to workers more often than this "
                                                      "(default: server.max_deliveries)")
    g.add_argument("--window", type=at_least(1), default=1024, help="trials on the queue at once")


LM_SERVER_HELP = "serve LM decoding over Redis streams (the published LM server protocol)"
LM_SERVER_DESCRIPTION = (
    "A drop-in replacement for the published language-model-standalone.py: the same Redis streams, keys "
    "and fields (remote_lm_input, remote_lm_output_partial/final, reset/finalize/update_params with "
    "acknowledgements, remote_lm_args, contextual_decoding_current_context), the same flags where they "
    "apply. Decodes with N worker processes; clients may open independent sessions (stream prefix "
    "SESSION:) to decode many trials at once. Malformed requests get an 'error' field in the reply. "
    "SIGTERM finishes the trials under way (up to --drain-timeout; a second SIGTERM stops at once), answers "
    "whatever is still unanswered with an error, then exits 0.")
EVALUATE_HELP = "decode a logits file through a private Redis + LM server and score it"
EVALUATE_DESCRIPTION = (
    "Starts redis-server (Unix socket, no persistence) and `b2txt lm-server` as children that die with this "
    "process, sends every trial's logits (LM column order) over the published protocol with several "
    "sessions at once, re-sends trials that got no answer (timeouts, server restarts) and writes OUT_DIR/"
    "decoded.csv, nbest.jsonl, submission.csv (id,text) and, for labelled trials, WER tables (wer.json, "
    "wer_per_session.csv, wer_per_corpus.csv) and greedy PER tables (metrics.json, per_session.csv, ...). "
    "With --group-workers N and/or --external-workers the trials go instead, whole, onto a Redis stream that "
    "`b2txt lm-worker` processes share as a consumer group (on this host, or on others through --bind/--port "
    "with a password and optionally TLS); the trials of a worker that dies are claimed by another, and the "
    "outputs are the same files.")


LM_WORKER_HELP = "decode whole trials shared through a Redis consumer group (batch evaluation on many hosts)"
LM_WORKER_DESCRIPTION = (
    "Loads the decoder once, then takes one trial at a time from the stream QUEUE:trials (consumer group "
    "lm-workers, XREADGROUP), decodes it with the options the trial carries, writes the result and "
    "acknowledges the entry atomically. Trials pending on a worker that died are claimed after "
    "--claim-idle-ms (XAUTOCLAIM). SIGTERM finishes the trial under way, then exits 0. A wrong password "
    "or a failed TLS handshake is a one-line error (exit 2). Start `b2txt evaluate --external-workers` "
    "(or --group-workers) to put trials on the queue.")


COMMANDS = (
    Command("lm-server", LM_SERVER_HELP, LM_SERVER_DESCRIPTION, add_lm_server_arguments, run_lm_server,
            ("lm", "rescore")),
    Command("lm-worker", LM_WORKER_HELP, LM_WORKER_DESCRIPTION, add_lm_worker_arguments, run_lm_worker,
            ("lm", "rescore")),
    Command("evaluate", EVALUATE_HELP, EVALUATE_DESCRIPTION, add_evaluate_arguments, run_evaluate,
            ("lm", "rescore")),
)
