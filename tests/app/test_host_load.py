"""CPU steal from /proc/stat (nir_lightning/app/host_load.py) and where nir register reports it."""

from __future__ import annotations

from pathlib import Path

import pytest

from nir_lightning.app.host_load import StealMeter, parse_cpu_line, steal_percent, stolen_seconds
from nir_lightning.app.run_record import summary_line


def test_steal_between_two_readings_of_the_aggregate_cpu_line(tmp_path: Path) -> None:
    """Guest time is inside user and nice, so the total is the first eight fields; per-CPU lines are ignored."""
    text = "cpu  700 10 90 900 100 0 0 200 50 0\ncpu0 350 5 45 450 50 0 0 100 25 0\nintr 5"
    assert parse_cpu_line(text) == (2000, 200)
    assert parse_cpu_line("cpu 10 0 5 85") == (100, 0)  # an old kernel: no steal field
    assert parse_cpu_line("intr 1") is None
    assert steal_percent((2000, 200), (2400, 300)) == pytest.approx(25.0)
    assert steal_percent((2000, 200), (2000, 200)) is None and steal_percent(None, (1, 0)) is None
    assert stolen_seconds(None, (1, 0)) is None and stolen_seconds((5, 7), (9, 7)) == 0.0
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 0 100 0 0 0 0 0 0\n")
    with StealMeter(path=stat) as meter:
        stat.write_text("cpu  130 0 0 130 0 0 0 40 0 0\n")  # 100 jiffies pass, 40 of them stolen
    assert meter.percent == pytest.approx(40.0)
    with StealMeter(path=tmp_path / "missing") as absent:
        pass
    assert absent.percent is None


def _metrics(**extra: float) -> dict[str, float | int]:
    return {"steps": 250, "seconds_fit": 10.0, "folding_percent": 0.0, "folding_count": 0, "seconds_total": 20.0, **extra}


def test_the_last_line_flags_timings_made_while_the_host_took_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    quiet = summary_line(_metrics(seconds_cpu_stolen=0.5), Path("out"))  # 0.5 of 40 CPU seconds: 1 %
    assert "steal" not in quiet and quiet.endswith("outputs in out/")
    assert "steal" not in summary_line(_metrics(), Path("out"))  # not measured (not Linux): nothing said
    loud = summary_line(_metrics(seconds_cpu_stolen=8.0), Path("out"))  # 8 of 40: 20 %
    assert "the host took 20 % of this machine's CPU time while it ran: its seconds are not the machine's" in loud
