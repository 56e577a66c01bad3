"""One result, one writer: the output lock (nir_lightning.app.lock) and its use by `nir register` and `nir apply`."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nir_lightning.app.lock import (
    LOCK_NAME,
    LockedError,
    LockInfo,
    acquire,
    file_lock_path,
    folder_lock_path,
    lock_folder,
    read_lock,
)
from nir_lightning.cli import main


def _plant(path: Path, *, pid: int, host: str | None = None, process_start: int | None = None) -> LockInfo:
    """A lock file as another process would have left it."""
    info = LockInfo(host=host or socket.gethostname(), pid=pid, started=time.time() - 60, process_start=process_start, token="other")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info.__dict__))
    return info


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_file_names_its_holder_and_goes_away(tmp_path: Path) -> None:
    out = tmp_path / "new" / "out"
    with lock_folder(out, what="x") as lock:
        info = read_lock(out / LOCK_NAME)
        assert info is not None and info.pid == os.getpid() and info.host == socket.gethostname()
        assert abs(info.started - time.time()) < 60 and lock.path == (out / LOCK_NAME).absolute()
        with lock_folder(out, what="x"):  # re-entrant in one process (register-many, then register_pair)
            pass
        assert (out / LOCK_NAME).is_file()
    assert not out.exists() and not (tmp_path / "new").exists()  # folders made only for the lock are removed when empty


def test_another_thread_of_the_process_is_refused(tmp_path: Path) -> None:
    import threading

    errors: list[BaseException] = []

    def second() -> None:
        try:
            lock_folder(tmp_path, what="out").release()
        except LockedError as exc:
            errors.append(exc)

    with lock_folder(tmp_path, what="out"):
        t = threading.Thread(target=second)
        t.start()
        t.join()
    assert len(errors) == 1 and "another thread of this process" in str(errors[0])


def test_live_holder_stops_a_second_process_with_its_pid(tmp_path: Path) -> None:
    other = _plant(folder_lock_path(tmp_path), pid=os.getppid())  # a live process of this host
    with pytest.raises(LockedError) as err:
        lock_folder(tmp_path, what=f"--output '{tmp_path}'")
    msg = str(err.value)
    assert f"--output '{tmp_path}' is being written by PID {os.getppid()} on host {socket.gethostname()} since " in msg
    assert "wait for it, or, if that process is gone, remove the lock file" in msg
    assert read_lock(folder_lock_path(tmp_path)) == other  # untouched


def test_stale_lock_is_taken_over_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pid = _dead_pid()
    _plant(folder_lock_path(tmp_path), pid=pid)
    with caplog.at_level(logging.WARNING, logger="nir_lightning"), lock_folder(tmp_path, what="out"):
        assert read_lock(folder_lock_path(tmp_path)).pid == os.getpid()  # type: ignore[union-attr]
    assert f"taking over the lock of PID {pid}" in caplog.text and "no longer running" in caplog.text
    assert not folder_lock_path(tmp_path).exists()
    # a live PID that started after the lock was taken (the PID was reused) is stale too
    _plant(folder_lock_path(tmp_path), pid=os.getppid(), process_start=-1)
    with lock_folder(tmp_path, what="out"):
        pass


def test_lock_of_another_host_is_kept_unless_forced(tmp_path: Path) -> None:
    _plant(folder_lock_path(tmp_path), pid=_dead_pid(), host="elsewhere.example")
    with pytest.raises(LockedError, match="PID .* on host elsewhere.example .* if that process on elsewhere.example is gone"):
        lock_folder(tmp_path, what="out")
    with lock_folder(tmp_path, what="out", force=True):
        assert read_lock(folder_lock_path(tmp_path)).host == socket.gethostname()  # type: ignore[union-attr]


def test_release_leaves_a_lock_taken_over_by_another(tmp_path: Path) -> None:
    lock = lock_folder(tmp_path, what="out")
    planted = _plant(folder_lock_path(tmp_path), pid=os.getppid())  # e.g. after --force-unlock elsewhere
    lock.release()
    assert read_lock(folder_lock_path(tmp_path)) == planted


def test_waiting_for_a_lock(tmp_path: Path) -> None:
    path = file_lock_path(tmp_path / "summary.csv")
    assert path.name == ".summary.csv.nir.lock"
    _plant(path, pid=os.getppid())
    t0 = time.perf_counter()
    with pytest.raises(LockedError):
        acquire(path, what="summary", wait_s=0.3)
    assert 0.3 <= time.perf_counter() - t0 < 5


def test_register_into_a_locked_folder_exits_2_and_touches_nothing(tmp_path: Path, tiny_pair: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    _plant(folder_lock_path(out), pid=os.getppid())
    (out / "warped.nii.gz").write_bytes(b"partial")  # what the other process has written so far
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    argv = ["register", "--fixed", str(tiny_pair["fixed"]), "--moving", str(tiny_pair["moving"]), "--output", str(out), "--overwrite"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"is being written by PID {os.getppid()} on host" in err and "--force-unlock" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_apply_to_a_locked_output_exits_2(tmp_path: Path, tiny_pair: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    result = tmp_path / "result"
    result.mkdir()
    (result / "metrics.json").write_text("{}")
    (result / "displacement.nii.gz").write_bytes(b"")  # never read: the lock comes first
    target = tmp_path / "warped2.nii.gz"
    _plant(file_lock_path(target), pid=os.getppid())
    argv = ["apply", "--transform", str(result), "--input", str(tiny_pair["moving"]), "--reference", str(tiny_pair["fixed"]), "--output", str(target)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--output '{target}' is being written by PID {os.getppid()}" in err and not target.exists()


def _register_cmd(files: dict[str, Path], out: Path, seed: int, steps: int) -> list[str]:
    return [sys.executable, "-m", "nir_lightning.cli", "register", "--fixed", str(files["fixed"]), "--moving", str(files["moving"]),
            "--output", str(out), "--seed", str(seed), "--affine", "none", "--checkpoint-every", "0", "--threads", "1",
            f"--trainer.max_steps={steps}"]


def test_two_registrations_racing_on_one_folder(tmp_path: Path, tiny_pair: dict[str, Path]) -> None:
    """Started together: exactly one exits 0, the other 2 naming the winner; the folder is the winner's, file by file."""
    out = tmp_path / "out"
    env = {**os.environ, "WANDB_MODE": "disabled", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(_register_cmd(tiny_pair, out, seed, 20), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)]
    logs = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], logs
    win, lose = (0, 1) if codes[0] == 0 else (1, 0)
    err = logs[lose][1]
    assert f"is being written by PID {procs[win].pid} on host {socket.gethostname()}" in err and "Traceback" not in err, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["seed"] == (1, 2)[win] and metrics["steps"] == 20
    assert not (out / LOCK_NAME).exists()
    # file by file, the folder is what the winner alone writes (same seed, one thread: bitwise)
    from nir_lightning import register_pair

    solo = tmp_path / "solo" / "out"
    register_pair(tiny_pair["fixed"], tiny_pair["moving"], output=solo, seed=(1, 2)[win], affine="none", checkpoint_every=0,
                  threads=1, quiet=True, overrides={"trainer.max_steps": 20})
    for name in ("warped.nii.gz", "displacement.nii.gz", "jacobian_det.nii.gz", "affine.mat", "qc.png"):
        assert _digest(out / name) == _digest(solo / name), name


def _digest(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha256(gzip.decompress(data) if path.name.endswith(".gz") else data).hexdigest()  # gzip headers hold a time


def test_sigterm_releases_the_lock(tmp_path: Path) -> None:
    """A batch system's time limit (SIGTERM) must not leave a lock that another host would find."""
    code = ("import sys, time; from nir_lightning.app.lock import lock_folder\n"
            f"with lock_folder({str(tmp_path)!r}, what='out'):\n    print('locked', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    assert read_lock(folder_lock_path(tmp_path)).pid == proc.pid  # type: ignore[union-attr]
    proc.terminate()
    assert proc.wait(timeout=30) == 128 + 15
    assert not folder_lock_path(tmp_path).exists()


def test_register_takes_over_the_lock_of_a_killed_run(tmp_path: Path, tiny_pair: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    from nir_lightning import register_pair

    out = tmp_path / "out"
    pid = _dead_pid()
    _plant(folder_lock_path(out), pid=pid)  # e.g. a run killed with SIGKILL
    with caplog.at_level(logging.WARNING, logger="nir_lightning"):
        result = register_pair(tiny_pair["fixed"], tiny_pair["moving"], output=out, affine="none", checkpoint_every=0, quiet=True,
                               overrides={"trainer.max_steps": 2})
    assert result.metrics["steps"] == 2 and f"taking over the lock of PID {pid}" in caplog.text
    assert not folder_lock_path(out).exists()
