"""``register-many`` under ``torchrun``/SLURM: ranks, devices, and a plain single process per pair.

The pairs are independent (no gradient sync); torch.distributed only agrees on who does which
pair and collects the summary rows.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch

from nir_lightning.errors import InputError

# Environment that makes Lightning think it is one process of a multi-process job.
_LAUNCHER_ENV = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
    "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
)
_LAUNCHER_ENV_PREFIXES = ("TORCHELASTIC_", "SLURM_", "OMPI_COMM_WORLD_", "PMI_", "PMIX_", "JSM_NAMESPACE_", "LSB_")


@contextlib.contextmanager
def single_process_lightning() -> Iterator[None]:
    """Make Lightning see a plain single process while one pair is fitted.

    Under torchrun/SLURM the launcher's variables make Lightning pick TorchElastic/SLURM cluster
    environments (and validate ``devices`` against the world size), and ``rank_zero_only.rank``
    (read from ``RANK`` at import) silences the CSV logger on ranks > 0. Both are undone here
    and restored afterwards; the torch.distributed process group is left alone (Lightning's
    single-device strategy never uses it).
    """
    from nir_lightning.app.startup import collector_off

    with collector_off():  # most of Lightning, on the first pair: before register_pair turns the collector off itself
        from lightning_fabric.utilities import rank_zero as fabric_rank_zero
        from lightning_utilities.core import rank_zero as utils_rank_zero

    saved = {k: v for k, v in os.environ.items() if k in _LAUNCHER_ENV or k.startswith(_LAUNCHER_ENV_PREFIXES)}
    ranks = (getattr(fabric_rank_zero.rank_zero_only, "rank", 0), getattr(utils_rank_zero.rank_zero_only, "rank", 0))
    for key in saved:
        del os.environ[key]
    # rank_zero_only is a function carrying a `rank` attribute (set from RANK at import)
    setattr(fabric_rank_zero.rank_zero_only, "rank", 0)  # noqa: B010
    setattr(utils_rank_zero.rank_zero_only, "rank", 0)  # noqa: B010
    try:
        yield
    finally:
        os.environ.update(saved)
        setattr(fabric_rank_zero.rank_zero_only, "rank", ranks[0])  # noqa: B010
        setattr(utils_rank_zero.rank_zero_only, "rank", ranks[1])  # noqa: B010


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device_index: int | None = None  # CUDA device this rank uses, if any
    backend: str | None = None


def dist_env() -> Dist:
    def env_int(key: str, default: int) -> int:
        try:
            return int(os.environ.get(key, default))
        except ValueError:
            raise InputError(f"environment variable {key}={os.environ[key]!r} is not an integer.") from None

    d = Dist(rank=env_int("RANK", 0), world=env_int("WORLD_SIZE", 1), local_rank=env_int("LOCAL_RANK", 0))
    if not 0 <= d.rank < max(d.world, 1):
        raise InputError(f"RANK={d.rank} is outside WORLD_SIZE={d.world}.")
    return d


def setup_distributed(d: Dist, backend: str, timeout_hours: float, use_cuda: bool) -> None:
    if use_cuda:
        d.device_index = d.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(d.device_index)
    if d.world > 1:
        import torch.distributed as dist

        d.backend = backend if backend != "auto" else ("nccl" if use_cuda else "gloo")
        dist.init_process_group(d.backend, timeout=timedelta(hours=timeout_hours))


def barrier(d: Dist) -> None:
    import torch.distributed as dist

    if d.backend == "nccl" and d.device_index is not None:
        dist.barrier(device_ids=[d.device_index])
    else:
        dist.barrier()
