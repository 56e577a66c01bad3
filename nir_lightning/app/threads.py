"""How many CPU threads a registration uses.

Measured (``benchmarks/README.md``, "Threads"): on an idle 2-core machine two torch threads fit
a pair faster than one, but when other processes already keep the cores busy, OpenMP threads
that spin for a core slow every step several-fold. So the default is the cores this process
may use (its CPU affinity, not the machine's count) less the current load; an explicit
``OMP_NUM_THREADS`` or ``--threads`` wins.
"""

from __future__ import annotations

import os

from nir_lightning.errors import InputError


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask; cgroup-limited containers included).

    >>> usable_cores() >= 1
    True
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def default_threads() -> int:
    """Threads when none are asked for: ``OMP_NUM_THREADS`` when set (at most the usable cores),
    else the usable cores less the 1-minute load average (rounded), at least 1."""
    cores = usable_cores()
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) >= 1:
        return min(int(omp), cores)
    return max(1, min(cores, cores - int(_load() + 0.5)))


def resolve_threads(threads: int | None) -> int:
    """``threads`` checked against the usable cores, or :func:`default_threads` for ``None``.

    >>> resolve_threads(1)
    1
    >>> resolve_threads(0)
    Traceback (most recent call last):
    ...
    nir_lightning.errors.InputError: --threads must be >= 1 (CPU threads of torch), got 0; leave it out to use the usable cores less the current load.
    """
    if threads is None:
        return default_threads()
    if threads < 1:
        raise InputError(f"--threads must be >= 1 (CPU threads of torch), got {threads}; leave it out to use the usable cores less the current load.")
    cores = usable_cores()
    if threads > cores:
        raise InputError(f"--threads {threads} is more than the {cores} CPU cores this process may use; more threads than cores only slow every step. Use --threads {cores} or less.")
    return threads
