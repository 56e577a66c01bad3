"""CPU steal of a virtual machine: the share of its CPU time the host gave to other machines
(``st`` in ``vmstat``/``top``), read from ``/proc/stat``.

Seconds measured while the steal is high are not the machine's: on a 2-core dev VM the same 2 mm
fit took 12.8 s at no steal and 16.4 s at 19-35 % steal an hour later. ``nir register`` records
the CPU seconds stolen while it ran (``metrics.json``'s ``seconds_cpu_stolen``) and says so in its
last line when they reach :data:`STEAL_NOTE_SHARE` of the machine's CPU time; the benchmark scripts
put the steal of each timed run beside its seconds. Linux only; elsewhere ``None``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["STEAL_NOTE_SHARE", "StealMeter", "cpu_times", "parse_cpu_line", "steal_percent", "stolen_seconds"]

PROC_STAT = Path("/proc/stat")

STEAL_NOTE_SHARE = 0.05
"""From this share of the machine's CPU time stolen, timings are flagged as not the machine's."""


def parse_cpu_line(text: str) -> tuple[int, int] | None:
    """``(all jiffies, stolen jiffies)`` of the aggregate ``cpu`` line of ``/proc/stat`` text.

    The fields after ``cpu`` are user, nice, system, idle, iowait, irq, softirq, steal, guest,
    guest_nice; guest time is already inside user and nice, so the total is the first eight.

    >>> parse_cpu_line("cpu  100 0 50 800 10 0 0 40 0 0\\ncpu0 1 2 3 4 5 6 7 8 9 10")
    (1000, 40)
    >>> parse_cpu_line("intr 1 2 3") is None
    True
    """
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            values = [int(v) for v in fields[1:9]]
            values += [0] * (8 - len(values))  # kernels before 2.6.11 list no steal
            return sum(values), values[7]
    return None


def cpu_times(path: Path = PROC_STAT) -> tuple[int, int] | None:
    """:func:`parse_cpu_line` of ``path`` now; ``None`` where it cannot be read (not Linux)."""
    try:
        return parse_cpu_line(path.read_text())
    except (OSError, ValueError):
        return None


def steal_percent(start: tuple[int, int] | None, end: tuple[int, int] | None) -> float | None:
    """Stolen share (%) of all CPU time between two :func:`cpu_times` readings (``None`` if either is missing or no time passed).

    >>> steal_percent((1000, 40), (1400, 140))
    25.0
    """
    if start is None or end is None or end[0] <= start[0]:
        return None
    return 100.0 * (end[1] - start[1]) / (end[0] - start[0])


def stolen_seconds(start: tuple[int, int] | None, end: tuple[int, int] | None) -> float | None:
    """CPU seconds (summed over the machine's CPUs) stolen between two :func:`cpu_times` readings.

    >>> stolen_seconds((1000, 40), (1400, 140)) == 100 / _ticks_per_second()
    True
    """
    if start is None or end is None:
        return None
    return (end[1] - start[1]) / _ticks_per_second()


def _ticks_per_second() -> int:
    try:
        return int(os.sysconf("SC_CLK_TCK"))
    except (AttributeError, ValueError, OSError):
        return 100  # Linux's USER_HZ


@dataclass
class StealMeter:
    """``with StealMeter() as m: ...`` then ``m.percent``: the steal over the block (``None`` off Linux)."""

    path: Path = PROC_STAT
    percent: float | None = field(default=None, init=False)
    _start: tuple[int, int] | None = field(default=None, init=False, repr=False)

    def __enter__(self) -> StealMeter:  # noqa: PYI034 -- typing.Self needs Python 3.11; the package supports 3.10
        self._start = cpu_times(self.path)
        return self

    def __exit__(self, *exc: object) -> None:
        self.percent = steal_percent(self._start, cpu_times(self.path))
