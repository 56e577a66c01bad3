"""The default thread count: the usable cores less the ones busy now, not a minute ago."""

from __future__ import annotations

import itertools

import pytest

from nir_lightning.app import threads


@pytest.fixture
def two_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda _pid: {0, 1})
    monkeypatch.setattr(threads.time, "sleep", lambda _s: None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def _window(monkeypatch: pytest.MonkeyPatch, idle_share: float) -> None:
    """/proc/stat of two CPUs over a window of 30 jiffies each, ``idle_share`` of them idle."""
    samples = itertools.cycle([(1000.0, 2000.0), (1000.0 + 60 * idle_share, 2060.0)])
    monkeypatch.setattr(threads, "_cpu_times", lambda _cpus: next(samples))


def test_idle_by_the_load_average_takes_every_core_without_looking(two_cpus: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "_load", lambda: 0.3)
    monkeypatch.setattr(threads, "_cpu_times", lambda _cpus: pytest.fail("no /proc/stat window on an idle machine"))
    assert threads.free_cores() == threads.default_threads() == 2


def test_a_finished_jobs_load_does_not_count(two_cpus: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The previous command of a shell loop left a load average of 2; the cores are idle now."""
    monkeypatch.setattr(threads, "_load", lambda: 2.0)
    _window(monkeypatch, idle_share=1.0)
    assert threads.default_threads() == 2
    _window(monkeypatch, idle_share=0.5)  # another process keeps one core busy
    assert threads.default_threads() == 1
    _window(monkeypatch, idle_share=0.0)
    assert threads.default_threads() == 1  # at least one


def test_unreadable_proc_stat_falls_back_to_the_load_average(two_cpus: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "_load", lambda: 1.2)
    monkeypatch.setattr(threads, "_cpu_times", lambda _cpus: None)
    assert threads.free_cores() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.default_threads() == 2  # an explicit OMP_NUM_THREADS wins


def test_cpu_times_reads_only_the_cpus_given() -> None:
    both, one = threads._cpu_times({0, 1}), threads._cpu_times({0})
    if both is None or one is None:
        pytest.skip("no /proc/stat here")
    assert 0 < one[1] <= both[1] and 0 <= one[0] <= one[1]
