"""`nir register-many --workers`: how many worker processes, and what happens when one dies."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from nir_lightning.app.local_workers import WorkerPlan, launched, plan_workers, supervise, worker_argv
from nir_lightning.errors import InputError


def plan(requested: int | None = None, threads: int | None = None, **kw: object) -> WorkerPlan:
    args: dict[str, object] = {"free": 2, "usable": 2, "pairs": 6, "gpu": False, "launched": False}
    args.update(kw)
    return plan_workers(requested, threads, **args)  # type: ignore[arg-type]


def test_auto_uses_each_free_core_within_pairs_and_memory() -> None:
    assert (plan().workers, plan().threads) == (2, 1)
    assert (plan(free=16, usable=16, pairs=20).workers, plan(free=16, usable=16, pairs=5).workers) == (16, 5)
    assert plan(free=16, usable=16, fit_in_memory=3).workers == 3
    assert "memory for 3" in plan(free=16, usable=16, fit_in_memory=3).reason
    assert plan(free=1).workers == 1 and plan(free=1).threads is None  # one process, the single-process default threads
    assert (plan(None, 2, free=8, usable=8).workers, plan(None, 2, free=8, usable=8).threads) == (4, 2)  # --threads 2: 4 workers
    assert plan(gpu=True, free=8, usable=8) == WorkerPlan(1, None, "--workers auto: one process on the GPU")
    assert plan(pairs=1).workers == 1


def test_explicit_workers_split_the_cores_and_launches_keep_one() -> None:
    assert (plan(3, free=1, usable=6).workers, plan(3, free=1, usable=6).threads) == (3, 2)  # asked for: not limited by the load
    assert plan(4, pairs=2).workers == 2
    assert plan(1) == WorkerPlan(1, None, "--workers 1")
    assert plan(None, launched=True).workers == 1 and plan(1, launched=True).workers == 1
    with pytest.raises(InputError, match="already one rank of a launch.*--nproc-per-node"):
        plan(2, launched=True)
    assert launched({"RANK": "0"}) and launched({"WORLD_SIZE": "2"}) and not launched({})


def test_worker_argv_replaces_workers_and_threads() -> None:
    argv = ["--pairs", "p.csv", "--workers", "auto", "--threads=3", "--output", "o", "--trainer.max_steps=5"]
    assert worker_argv(argv, 1) == ["--pairs", "p.csv", "--output", "o", "--trainer.max_steps=5", "--workers", "1", "--threads", "1"]
    assert worker_argv(["--pairs", "p.csv"], None) == ["--pairs", "p.csv", "--workers", "1"]


def _child(code: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", code])


def test_a_dead_worker_stops_the_others(capsys: pytest.CaptureFixture[str]) -> None:
    t0 = time.monotonic()
    procs = [_child("import time; time.sleep(60)"), _child("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")]
    assert supervise(procs, poll_s=0.05) == 1
    assert time.monotonic() - t0 < 30 and procs[0].returncode is not None and procs[0].returncode != 0  # rank 0 stopped, not waited for
    err = capsys.readouterr().err
    assert "worker 1 (of 2) was killed by signal 9" in err and "run the same command again" in err
    procs = [_child("import time; time.sleep(60)"), _child("raise SystemExit(3)")]
    assert supervise(procs, poll_s=0.05) == 1 and "worker 1 (of 2) exited with status 3" in capsys.readouterr().err


def test_rank0_status_is_the_job_status_and_stragglers_are_stopped(capsys: pytest.CaptureFixture[str]) -> None:
    procs = [_child("import time; time.sleep(0.5); raise SystemExit(4)"), _child("pass")]
    assert supervise(procs, poll_s=0.05) == 4  # e.g. 4 failed pairs; the other worker ended with 0
    procs = [_child("raise SystemExit(0)"), _child("import time; time.sleep(60)")]
    assert supervise(procs, poll_s=0.05, grace_s=0.5) == 1
    assert procs[1].returncode is not None and "worker 0 ended 0 s before the other workers" in capsys.readouterr().err


def test_the_plan_imports_neither_torch_nor_lightning(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Deciding the workers costs no torch import on a machine without an NVIDIA driver."""
    from pathlib import Path

    if Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists():
        pytest.skip("an NVIDIA driver: the plan asks CUDA")
    (tmp_path / "p.csv").write_text("fixed,moving\nf1.nii.gz,m1.nii.gz\nf2.nii.gz,m2.nii.gz\n")
    probe = (
        "import sys\n"
        "from nir_lightning.app.local_workers import plan_from_argv\n"
        f"plan = plan_from_argv(['--pairs', {str(tmp_path / 'p.csv')!r}, '--output', {str(tmp_path / 'o')!r}, '--workers', '2'])\n"
        "print(plan.workers, sorted(m for m in ('torch', 'pytorch_lightning', 'monai') if m in sys.modules))\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False, env=env)
    assert proc.stdout.strip() == "2 []", (proc.stdout, proc.stderr)


def test_the_plan_from_a_command_line_reads_cores_memory_and_images(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from nir_lightning.app import local_workers
    from nir_lightning.data.phantom import write_demo_pair

    write_demo_pair(tmp_path / "d", shape=(36, 38, 36), seed=0)
    (tmp_path / "p.csv").write_text("fixed,moving\n" + "d/fixed.nii.gz,d/moving.nii.gz\n" * 3 + "d/fixed.nii.gz,missing.nii.gz\n")
    argv = ["--pairs", str(tmp_path / "p.csv"), "--output", str(tmp_path / "o")]
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(local_workers, "free_cores", lambda: 8)
    monkeypatch.setattr(local_workers, "usable_cores", lambda: 8)
    monkeypatch.setattr(local_workers, "available_memory", lambda: 64 * 2**30)
    assert local_workers.largest_image_voxels([str(tmp_path / "d" / "fixed.nii.gz"), str(tmp_path / "missing.nii.gz")]) == 36 * 38 * 36
    assert local_workers.plan_from_argv(argv) == WorkerPlan(4, 1, "--workers auto: 8 free cores, 4 pairs")
    monkeypatch.setattr(local_workers, "available_memory", lambda: int(1.5 * 2**30))  # room for two workers of 0.6 GB and a little
    assert local_workers.plan_from_argv(argv) == WorkerPlan(2, 1, "--workers auto: 8 free cores, 4 pairs, memory for 2")
    assert local_workers.plan_from_argv([*argv, "--workers", "3"]) == WorkerPlan(3, 2, "--workers 3")  # asked for: as asked
    assert local_workers.plan_from_argv([*argv, "--trainer.accelerator=gpu"]).workers == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert local_workers.plan_from_argv(argv) == WorkerPlan(1, None, "a rank of a launch")
