"""Data-parallel training: which process am I, how many are there, and the few collectives the
trainer needs (:class:`b2txt.training.trainer.Trainer` is the only user).

Three ways to start N training processes, all running the same ``b2txt train`` command:

- ``b2txt train --nproc N``: spawns N local processes that meet on a free loopback port;
- ``torchrun --nproc-per-node N -m b2txt train ...``: reads ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``;
- ``srun --ntasks N b2txt train ...`` (Slurm): reads ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``
  and ``SLURM_LOCALID``; the address is ``MASTER_ADDR`` or the step's first node.

The backend is ``gloo`` on the CPU and ``nccl`` on CUDA. Every rank draws the same global batch
and trains on its own contiguous share of it (:meth:`DistContext.shard`); the gradients are
averaged, so N processes with B/N trials each take the step one process takes with B.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Mapping, Sequence, TypeVar

import torch
import torch.distributed as dist

from ..ground.errors import B2txtError
from ..ground.procs import die_with_parent

T = TypeVar("T")

# Rank 0 validates and writes checkpoints while the others wait in the next collective; a long
# validation of a large data set must not trip the default timeout.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class DistContext:
    """This process's place in the group; ``DistContext()`` is one process on its own."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> Sequence[T]:
        """This rank's contiguous share of a global batch (its size is a multiple of world_size)."""
        n = len(items) // self.world_size
        return items[self.rank * n: (self.rank + 1) * n]

    def mean(self, value: float) -> float:
        """The average of ``value`` over all ranks."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (e.g. its early-stopping decision)."""
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int64)
        dist.broadcast(t, src=0)
        return bool(t.item())

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    try:
        return int(env.get(key, default))
    except ValueError:
        raise B2txtError(f"environment variable {key}={env[key]!r} is not an integer") from None


def context_from_env(env: Mapping[str, str] | None = None) -> DistContext:
    """The group a launcher (torchrun, srun) started this process in; one process otherwise.

    Slurm's variables count only inside an ``srun`` step with several tasks
    (``SLURM_STEP_NUM_TASKS``): a batch script's own environment says nothing about the command.
    """
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE", 1)
        rank = _int(env, "RANK", 0)
        local = _int(env, "LOCAL_RANK", rank)
        local_world = _int(env, "LOCAL_WORLD_SIZE", world)
    elif _int(env, "SLURM_STEP_NUM_TASKS", 1) > 1:
        world = _int(env, "SLURM_STEP_NUM_TASKS", 1)
        rank = _int(env, "SLURM_PROCID", 0)
        local = _int(env, "SLURM_LOCALID", 0)
        local_world = max(1, world // max(_int(env, "SLURM_STEP_NUM_NODES", 1), 1))
    else:
        return DistContext()
    if not (0 <= rank < world and 0 <= local < max(local_world, 1)):
        raise B2txtError(f"inconsistent launcher environment: rank {rank}, local rank {local}, world size {world}")
    return DistContext(rank, world, local, local_world)


def rendezvous(env: Mapping[str, str] | None = None) -> tuple[str, int]:
    """Address and port of rank 0: ``MASTER_ADDR``/``MASTER_PORT``, else (srun) the step's first node."""
    env = os.environ if env is None else env
    addr = env.get("MASTER_ADDR")
    if addr is None and "SLURM_STEP_NODELIST" in env:
        try:
            hosts = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_STEP_NODELIST"]],
                                   capture_output=True, text=True, check=True, timeout=30).stdout.split()
        except (OSError, subprocess.SubprocessError) as e:
            raise B2txtError(f"cannot resolve SLURM_STEP_NODELIST with scontrol ({e}); set MASTER_ADDR") from None
        addr = hosts[0] if hosts else None
    port = env.get("MASTER_PORT") or str(29500 + _int(env, "SLURM_JOB_ID", 0) % 20000)
    return addr or "127.0.0.1", _int({"MASTER_PORT": port}, "MASTER_PORT", 29500)


def init_group(ctx: DistContext, device: torch.device, addr: str, port: int) -> None:
    """Join the process group (gloo on the CPU, nccl on CUDA)."""
    if device.type not in ("cpu", "cuda"):
        raise B2txtError(f"data-parallel training runs on cpu or cuda, not {device.type}; "
                         "on TPUs launch with torch_xla's own tools")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=ctx.rank,
                            world_size=ctx.world_size, timeout=COLLECTIVE_TIMEOUT)


def close_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, fn: Callable[..., None], *args: Any) -> None:
    """Run ``fn(ctx, addr, port, *args)`` in ``nproc`` fresh processes and wait for all of them.

    When one process fails, the others are stopped (they would wait for it forever) and the
    failure is one error naming the rank; each rank prints its own error message first.
    """
    import torch.multiprocessing as mp

    port = free_port()
    try:
        mp.start_processes(_entry, args=(nproc, port, fn, args), nprocs=nproc, join=True, start_method="spawn")
    except mp.ProcessExitedException as e:
        raise B2txtError(f"training process {e.error_index} of {nproc} failed (exit code {e.exit_code})") from None
    except mp.ProcessRaisedException as e:
        last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        last = re.sub(r"^b2txt(\.\w+)+: ", "", last)  # our errors' messages stand alone
        raise B2txtError(f"training process {e.error_index} of {nproc} failed: {last}") from None


def _entry(rank: int, nproc: int, port: int, fn: Callable[..., None], args: tuple) -> None:
    die_with_parent()  # a killed `b2txt train --nproc N` leaves no training process behind
    fn(DistContext(rank, nproc, rank, nproc), "127.0.0.1", port, *args)
