"""Durable results: every output's data reaches the disk before its rename, and the folder's
entries before ``metrics.json`` appears (checked by wrapping ``os.fsync``)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from nir_lightning import register_pair
from nir_lightning.io import write_text_atomic


def _record(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str, int]]:
    """Log ``("fsync", path, "", thread)`` and ``("replace", src, dst, thread)`` in call order
    (outputs may be written from more than one thread, e.g. the QC figure)."""
    events: list[tuple[str, str, str, int]] = []
    fsync, replace = os.fsync, os.replace

    def logged_fsync(fd: int) -> None:
        fsync(fd)
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), "", threading.get_ident()))

    def logged_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str], **kw: object) -> None:
        replace(src, dst, **kw)  # type: ignore[arg-type]
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst), threading.get_ident()))

    monkeypatch.setattr(os, "fsync", logged_fsync)
    monkeypatch.setattr(os, "replace", logged_replace)
    return events


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name the fsynced files")
def test_atomic_write_flushes_file_then_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events = _record(monkeypatch)
    write_text_atomic(tmp_path / "a.txt", "x")
    (kind1, tmp, _, _), (kind2, src, dst, _), (kind3, folder, _, _) = events
    assert (kind1, kind2, kind3) == ("fsync", "replace", "fsync")
    assert tmp == src and dst == str((tmp_path / "a.txt").resolve()) and folder == str(tmp_path.resolve())


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name the fsynced files")
def test_register_fsyncs_every_output_before_metrics_json(tmp_path: Path, tiny_pair: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    out = (tmp_path / "out").resolve()
    events = _record(monkeypatch)
    register_pair(tiny_pair["fixed"], tiny_pair["moving"], output=out, affine="none", checkpoint_every=0, quiet=True,
                  overrides={"trainer.max_steps": 2})
    renames = [(i, src, dst, th) for i, (kind, src, dst, th) in enumerate(events) if kind == "replace" and Path(dst).parent == out]
    names = [Path(dst).name for _, _, dst, _ in renames]
    assert names[-1] == "metrics.json" and {"warped.nii.gz", "displacement.nii.gz", "affine.mat", "jacobian_det.nii.gz", "qc.png"} <= set(names)
    folder_flushed: dict[str, int] = {}
    for i, src, dst, th in renames:
        # the file's data were flushed before the rename (same thread), and the folder right after it
        assert ("fsync", src, "", th) in events[:i], f"{dst} renamed before its data were flushed"
        after = next(e for e in events[i + 1:] if e[3] == th)
        assert after[:3] == ("fsync", str(out), ""), f"the folder was not flushed after renaming {dst}"
        folder_flushed[dst] = events.index(after, i + 1)
    # so every other output's entry was on disk before metrics.json's data were even flushed
    metrics_i, metrics_tmp = renames[-1][0], renames[-1][1]
    metrics_data = next(i for i, e in enumerate(events) if e[:2] == ("fsync", metrics_tmp))
    assert max(j for dst, j in folder_flushed.items() if not dst.endswith("metrics.json")) < metrics_data < metrics_i
