"""Process-group set-up for every way a run is started, a collective timeout, and rank helpers.

How each launcher describes the process (``detect``):

- ``torchrun`` and the ``deepspeed`` launcher export ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR`` and ``MASTER_PORT``; they win when present (also under SLURM, where the sbatch
  script runs one torchrun per node).
- ``srun python -m ijepa_fast.cli.pretrain`` (one task per GPU) sets ``SLURM_PROCID``,
  ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID`` and the node list: the first node is the master and
  the port is derived from the job id, so every task agrees without talking.
- A plain ``python -m ...`` is a world of one on 127.0.0.1 with a free port: a single node without
  SLURM needs no launcher at all.

``init`` exports those variables (DeepSpeed and ``env://`` read them), picks NCCL on CUDA and
gloo on CPU, and sets the collective timeout: an argument, else ``IJEPA_DIST_TIMEOUT_S``, else
30 minutes. The timeout holds for every process group of the job, not only the default one:
``torch.distributed.new_group`` without a timeout takes torch's module default (30 minutes on gloo),
and DeepSpeed creates its data-parallel groups that way, so ``init`` makes the job's timeout that
default too (``cleanup`` restores torch's). A rank that dies or stalls makes its peers' next
collective fail within the timeout instead of waiting forever: gloo raises at once on a closed
connection and at the timeout otherwise; NCCL's watchdog aborts the process at the timeout
(PyTorch's default ``TORCH_NCCL_ASYNC_ERROR_HANDLING``). Nothing here runs at import.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch

from ijepa_fast.runtime.device import resolve_device

log = logging.getLogger(__name__)

_TORCH_GROUP_DEFAULTS = ("default_pg_timeout", "default_pg_nccl_timeout")  # read by new_group at each call
_saved_group_defaults: dict[str, object] = {}  # torch's values while init's timeout replaces them
DEFAULT_TIMEOUT_S = 1800.0  # 30 min: a slow checkpoint write or a data stall on one rank must not kill the run
TIMEOUT_ENV = "IJEPA_DIST_TIMEOUT_S"
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # env (torchrun / deepspeed / any launcher exporting RANK) | slurm | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def as_environ(self) -> dict[str, str]:
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def free_port() -> int:
    """A TCP port free on this host now (for a world of one, and for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list to host names, as ``scontrol show hostnames`` prints them.

    ``"gpu[01-03,7],login1"`` -> ``["gpu01", "gpu02", "gpu03", "gpu7", "login1"]``.
    """
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
                continue
            width = len(lo)  # zero padding as written: 01-03 keeps two digits
            hosts.extend(f"{prefix}{i:0{width}d}" for i in range(int(lo), int(hi) + 1))
    return hosts


def _int(environ: Mapping[str, str], key: str) -> int:
    try:
        return int(environ[key])
    except ValueError:
        raise ValueError(f"environment variable {key}={environ[key]!r} is not an integer") from None


def detect(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Rank, world size and rendezvous address from the launcher's environment (module docstring)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
        world = _int(env, "WORLD_SIZE")
        if missing and world > 1:
            raise ValueError(
                f"RANK and WORLD_SIZE are set but {', '.join(missing)} is not: launch with torchrun "
                f"or deepspeed, or export them"
            )
        rank = _int(env, "RANK")
        return DistEnv(
            rank,
            world,
            int(env.get("LOCAL_RANK", rank)),
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", 0)) or free_port(),
            "env",
        )
    # srun sets SLURM_STEP_NUM_TASKS for the job step; SLURM_NTASKS alone is also set inside the batch
    # script itself, where only one process runs, so it does not make a world.
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        world = _int(env, "SLURM_STEP_NUM_TASKS")
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
        hosts = expand_nodelist(nodes)
        addr = env.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1")
        port = int(env.get("MASTER_PORT", 0))
        if not port:  # every task derives the same port from the job id (two jobs sharing a node differ)
            port = 20000 + _int(env, "SLURM_JOB_ID") % 20000 if "SLURM_JOB_ID" in env else 29500
        return DistEnv(_int(env, "SLURM_PROCID"), world, int(env.get("SLURM_LOCALID", 0)), addr, port, "slurm")
    return DistEnv(
        0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 0)) or free_port(), "single"
    )


def resolve_timeout(timeout_s: float | None = None, environ: Mapping[str, str] | None = None) -> timedelta:
    """The collective timeout: ``timeout_s``, else ``$IJEPA_DIST_TIMEOUT_S``, else 30 minutes."""
    env = os.environ if environ is None else environ
    if timeout_s is None:
        raw = env.get(TIMEOUT_ENV)
        try:
            timeout_s = float(raw) if raw else DEFAULT_TIMEOUT_S
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if timeout_s <= 0:
        raise ValueError(f"the collective timeout must be positive, got {timeout_s} s")
    return timedelta(seconds=timeout_s)


# What gloo and NCCL say when a collective's peer stalled (timeout) or died (closed connection).
_COLLECTIVE_FAILURE = re.compile(r"gloo|nccl|timed out|connection (closed|reset)", re.IGNORECASE)


def collective_failure(err: BaseException, timeout_s: float | None = None) -> str | None:
    """One line for an error of a collective whose peer stalled or died, naming the timeout in force
    (``timeout_s`` as ``init`` got it: ``run.dist_timeout_s``, else the environment or default);
    None when ``err`` is something else."""
    several = is_initialized() and get_world_size() > 1
    if not isinstance(err, torch.distributed.DistError) and not (several and _COLLECTIVE_FAILURE.search(str(err))):
        return None
    seconds = resolve_timeout(timeout_s).total_seconds()
    source = "run.dist_timeout_s" if timeout_s else TIMEOUT_ENV if os.environ.get(TIMEOUT_ENV) else "the default"
    detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    return (
        f"a collective failed after the {seconds:g} s timeout ({source}) or on a lost connection: another rank "
        f"stalled or died ({detail})"
    )


def device_for(env: DistEnv, requested: str = "auto") -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` for auto/cuda when CUDA is there, else ``requested``
    (``device.resolve_device``: the CPU, or a named CUDA device)."""
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", env.local_rank)
    dev = resolve_device(requested)
    if dev.type == "cuda" and env.world_size > 1 and dev.index not in (None, env.local_rank):
        raise ValueError(
            f"run.device={requested} but this is local rank {env.local_rank} of a multi-process "
            f"run: use run.device=cuda (each rank takes cuda:LOCAL_RANK)"
        )
    return dev


def init(
    env: DistEnv | None = None,
    *,
    backend: str | None = None,
    timeout_s: float | None = None,
    deepspeed: bool = False,
    device: torch.device | None = None,
) -> DistEnv:
    """Initialise the default process group (once) and return this process's DistEnv.

    Exports the rendezvous variables, sets the CUDA device, then runs ``deepspeed.init_distributed``
    (``deepspeed=True``) or ``torch.distributed.init_process_group`` with the timeout.
    """
    env = env or detect()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return env
    for key, value in env.as_environ().items():
        os.environ.setdefault(key, value)
    device = device or device_for(env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    timeout = resolve_timeout(timeout_s)
    _set_new_group_timeout(timeout)  # first: groups made during init take it too
    if deepspeed:
        from ijepa_fast.runtime.optional import require

        ds = require("deepspeed", "run.engine=deepspeed")
        ds.init_distributed(
            dist_backend=backend,
            auto_mpi_discovery=False,
            timeout=timeout,
            verbose=False,
            rank=env.rank,
            world_size=env.world_size,
        )
    else:
        torch.distributed.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=timeout)
    log.info(
        "process group: rank %d of %d (local %d) via %s, %s at %s:%d, timeout %.0f s",
        env.rank,
        env.world_size,
        env.local_rank,
        env.launcher,
        backend,
        env.master_addr,
        env.master_port,
        timeout.total_seconds(),
    )
    return env


def _set_new_group_timeout(timeout: timedelta) -> None:
    """Make ``timeout`` the one every later process group takes when its creator passes none
    (DeepSpeed's ``new_group(ranks)``; also ``new_subgroups``, ``split_group``, device meshes)."""
    from torch.distributed import distributed_c10d as c10d

    for name in _TORCH_GROUP_DEFAULTS:
        _saved_group_defaults.setdefault(name, getattr(c10d, name))
        setattr(c10d, name, timeout)


def _restore_new_group_timeout() -> None:
    from torch.distributed import distributed_c10d as c10d

    for name, value in _saved_group_defaults.items():
        setattr(c10d, name, value)
    _saved_group_defaults.clear()


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def get_rank() -> int:
    return torch.distributed.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return torch.distributed.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_initialized() and get_world_size() > 1:
        torch.distributed.barrier()


def cpu_group():
    """A process group for small host-side objects (``all_gather_object`` of Python data), or None in
    a world of one: the default group when it runs gloo, else a new gloo group of all ranks (made by
    every rank at the same call: it is a collective), so no object goes through GPU memory."""
    if not (is_initialized() and get_world_size() > 1):
        return None
    if torch.distributed.get_backend() == "gloo":
        return torch.distributed.group.WORLD
    return torch.distributed.new_group(backend="gloo")


def all_mean_(t: torch.Tensor) -> torch.Tensor:
    """In place: the mean of ``t`` over ranks (no-op in a world of one). Async on NCCL: no host sync."""
    if is_initialized() and get_world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        t.div_(get_world_size())
    return t


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """True on every rank when ``flag`` is true on any (a stop signal seen by one rank stops all at
    the same step). One host sync: call it at logging points, not every step."""
    if not (is_initialized() and get_world_size() > 1):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device or torch.device("cpu"))
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def failure_on_any_rank(
    action: Callable[[], object], device: torch.device | None = None, run: bool = True
) -> tuple[bool, Exception | None]:
    """Run ``action`` (where ``run``), then agree across ranks whether it failed anywhere: (failed on
    some rank, this rank's own error or None). One collective, so no rank is left waiting in one
    when another has failed."""
    error = None
    if run:
        try:
            action()
        except Exception as err:
            error = err
    return any_rank(error is not None, device), error


def cleanup() -> None:
    """Destroy the default process group if this process made one; torch's group timeout again."""
    if is_initialized():
        torch.distributed.destroy_process_group()
    _restore_new_group_timeout()
