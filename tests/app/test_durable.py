"""Durable results: every output's data reaches the disk before its rename, and the folder's
entries before ``metrics.json`` appears (checked by wrapping ``os.fsync``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nir_lightning import register_pair
from nir_lightning.io import write_text_atomic


def _record(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str]]:
    """Log ``("fsync", path, "")`` and ``("replace", src, dst)`` in call order."""
    events: list[tuple[str, str, str]] = []
    fsync, replace = os.fsync, os.replace

    def logged_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), ""))
        fsync(fd)

    def logged_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str], **kw: object) -> None:
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        replace(src, dst, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "fsync", logged_fsync)
    monkeypatch.setattr(os, "replace", logged_replace)
    return events


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name the fsynced files")
def test_atomic_write_flushes_file_then_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events = _record(monkeypatch)
    write_text_atomic(tmp_path / "a.txt", "x")
    (kind1, tmp, _), (kind2, src, dst), (kind3, folder, _) = events
    assert (kind1, kind2, kind3) == ("fsync", "replace", "fsync")
    assert tmp == src and dst == str((tmp_path / "a.txt").resolve()) and folder == str(tmp_path.resolve())


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name the fsynced files")
def test_register_fsyncs_every_output_before_metrics_json(tmp_path: Path, tiny_pair: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    out = (tmp_path / "out").resolve()
    events = _record(monkeypatch)
    register_pair(tiny_pair["fixed"], tiny_pair["moving"], output=out, affine="none", checkpoint_every=0, quiet=True,
                  overrides={"trainer.max_steps": 2})
    renames = [(i, src, dst) for i, (kind, src, dst) in enumerate(events) if kind == "replace" and Path(dst).parent == out]
    names = [Path(dst).name for _, _, dst in renames]
    assert names[-1] == "metrics.json" and {"warped.nii.gz", "displacement.nii.gz", "affine.mat", "jacobian_det.nii.gz", "qc.png"} <= set(names)
    for i, src, dst in renames:
        # the file's data were flushed before the rename, and the folder right after it
        assert ("fsync", src, "") in events[:i], f"{dst} renamed before its data were flushed"
        assert events[i + 1] == ("fsync", str(out), ""), f"the folder was not flushed after renaming {dst}"
    # so every other output's entry was on disk before metrics.json's data were even written
    metrics_i = renames[-1][0]
    last_other = max(i for i, _, dst in renames[:-1])
    assert last_other + 1 < metrics_i and events[last_other + 1] == ("fsync", str(out), "")
