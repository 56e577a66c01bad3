"""`nir report`: cohort reading, flags worst first, the HTML page, bad folders, the W&B table.

:func:`synthetic_cohort` writes result folders with jittered metrics (no fits), as
``register-many`` leaves them; the browser test (test_report_browser.py) uses it too.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nir_lightning.app.report import cohort_flags, load_cohort, log_cohort_table, write_report
from nir_lightning.app.report.flags import DICE_FELL_TOLERANCE, robust_z
from nir_lightning.cli import main
from nir_lightning.errors import InputError

LABELS = (2, 3, 4, 7, 8, 10, 11, 12, 13, 16, 17, 18)
SWAP_NOTE = ("the label maps look swapped: the fixed label map '/d/sub-02_aseg.nii.gz' fits the moving image better than the fixed image "
             "(label homogeneity 0.612 vs 0.455). Were --fixed-labels and --moving-labels swapped? Dice falls during registration if so.")
FOREIGN_NOTE = ("the moving label map '/d/sub-07_aseg.nii.gz' does not fit the moving image '/d/sub-03_T1.nii.gz': it fits the moving image "
                "hardly better than the fixed label map does (label homogeneity 0.52, advantage +0.01; the fixed map's advantage on its image is +0.20).")
FELL_NOTE = "Dice fell during registration, from 0.512 before to 0.301 after (by more than 0.02). Registration makes the label maps agree less."


def tiny_png(width: int = 48, height: int = 32, rgb: tuple[int, int, int] = (90, 140, 200)) -> bytes:
    """A valid solid-colour PNG, written without an imaging library."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _metrics(rng: np.random.Generator, i: int, *, version: str = "0.2.3", lr: float = 0.01) -> dict[str, Any]:
    before, affine = 0.35 + rng.normal(0, 0.03), 0.58 + rng.normal(0, 0.02)
    after = 0.80 + rng.normal(0, 0.012)
    a = np.eye(4)
    a[:3, :3] += rng.normal(0, 0.02, (3, 3))
    a[:3, 3] = rng.normal(0, 3, 3)
    per_label = {str(k): float(np.clip(after + rng.normal(0, 0.05) - 0.01 * (k % 5), 0, 1)) for k in LABELS}
    return {
        "fixed": "/data/mindboggle/sub-01/t1weighted_brain.nii.gz",
        "moving": f"/data/mindboggle/sub-{i + 2:04d}/t1weighted_brain.nii.gz",
        "dice_before": before, "dice_affine": affine, "dice_after": after, "dice_per_label": per_label,
        "hd95_before": 5.0 + rng.normal(0, 0.3), "hd95_after": 2.2 + rng.normal(0, 0.1),
        "folding_count": 0, "folding_percent": 0.0, "sdlogj": 0.12 + rng.normal(0, 0.005),
        "seconds_total": 60 + rng.normal(0, 5), "version": version,
        "affine": {"kind": "affine", "world": a.tolist()},
        "config": {"model": {"lr": lr, "similarity": "lncc", "field": {"class_path": "nir_lightning.fields.GridDisplacementField"}},
                   "data": {"fixed": "/x", "moving": f"/m{i}", "affine": {"kind": "affine"}}, "trainer": {"max_steps": 800, "devices": "1"}},
    }


def synthetic_cohort(root: Path, n: int, *, seed: int = 0, broken: bool = True, qc: bytes | None = None) -> Path:
    """``n`` completed pairs ``p0000 ...`` with jittered metrics, and with ``broken`` also:
    ``failed`` (summary.csv row and error.txt), ``swapped`` (swap note, Dice fell),
    ``foreign`` (foreign-map note, low Dice) and ``halfway`` (outputs, no metrics.json).
    Writes ``summary.csv`` as register-many does and a ``qc.png`` per completed pair."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    png = qc if qc is not None else tiny_png()
    rows = ["id,status,dice_before,dice_after,folding_percent,seconds,error"]
    ids = [f"p{i:04d}" for i in range(n)]
    for i, pid in enumerate(ids):
        d = root / pid
        d.mkdir(parents=True)
        m = _metrics(rng, i)
        (d / "metrics.json").write_text(json.dumps(m))
        (d / "qc.png").write_bytes(png)
        rows.append(f"{pid},completed,{m['dice_before']:.6g},{m['dice_after']:.6g},0,{m['seconds_total']:.6g},")
    if broken:
        for pid, notes, after in (("swapped", [SWAP_NOTE, FELL_NOTE], 0.30), ("foreign", [FOREIGN_NOTE], 0.55)):
            d = root / pid
            d.mkdir()
            m = _metrics(rng, 900)
            m.update(notes=notes, dice_after=after, dice_before=0.51 if pid == "swapped" else 0.33)
            (d / "metrics.json").write_text(json.dumps(m))
            (d / "qc.png").write_bytes(png)
            rows.append(f"{pid},completed,{m['dice_before']},{after},0,60,")
        (root / "failed").mkdir()
        (root / "failed" / "error.txt").write_text("Traceback (most recent call last):\n  ...\nInputError: moving image is truncated\n")
        rows.append("failed,failed,,,,0.5,moving image '/data/sub-0099/t1.nii.gz' is truncated or not gzip: EOFError. Check the file.")
        (root / "halfway").mkdir()
        (root / "halfway" / "warped.nii.gz").write_bytes(b"\x1f\x8b")
        rows.append("halfway,pending,,,,,")
    (root / "summary.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture()
def cohort_dir(tmp_path: Path) -> Path:
    return synthetic_cohort(tmp_path / "out", 16)


def _page(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _table_ids(html: str) -> list[str]:
    body = html.split('<table id="pairs">', 1)[1]
    return re.findall(r'<tr class="[a-z]+" data-id="([^"]+)"', body)


def test_flags_put_the_broken_pairs_first_with_their_reasons(cohort_dir: Path) -> None:
    cohort = load_cohort(cohort_dir)
    assert [len(cohort.by_status(s)) for s in ("completed", "failed", "pending")] == [18, 1, 1]
    flags = cohort_flags(cohort)
    assert [f.kind for f in flags["failed"]] == ["failed"] and "truncated" in flags["failed"][0].text
    assert flags["swapped"][0].kind == "swapped" and "dice_fell" in [f.kind for f in flags["swapped"]]
    assert flags["foreign"][0].kind == "foreign" and "dice_outlier" in [f.kind for f in flags["foreign"]]
    for pid in (f"p{i:04d}" for i in range(16)):  # the correct pairs: no cohort outlier, no warning
        assert flags[pid] == [], (pid, flags[pid])
    html = _page(write_report(cohort_dir))
    ids = _table_ids(html)
    assert ids[:3] == ["failed", "swapped", "foreign"] and ids[-1] == "halfway" and len(ids) == 20
    flag_list = html.split('<ol id="flags">', 1)[1].split("</ol>", 1)[0]
    assert re.findall(r'<li data-id="([^"]+)"', flag_list) == ["failed", "swapped", "foreign"]
    assert "label maps look swapped" in flag_list and "does not fit" in flag_list and "is an outlier for this cohort" in flag_list
    assert 'class="pending" data-id="halfway"' in html and "half-written" in html


def test_outlier_flags_use_the_cohort_spread() -> None:
    z = robust_z([0.80, 0.81, 0.79, 0.80, 0.30, None], floor=0.02)
    assert z[5] is None and z[4] is not None and z[4] < -20 and all(abs(v) < 1 for v in z[:4] if v is not None)


def test_dice_fell_tolerance_is_the_runs_own() -> None:
    from nir_lightning.training.label_watch import DICE_TOLERANCE

    assert DICE_TOLERANCE == DICE_FELL_TOLERANCE


def test_affine_sdlogj_folds_and_versions_are_flagged(tmp_path: Path) -> None:
    root = synthetic_cohort(tmp_path / "c", 12, broken=False)
    m = json.loads((root / "p0003" / "metrics.json").read_text())
    m["affine"]["world"] = (np.diag([1.25, 1.25, 1.25, 1.0])).tolist()  # another field of view: 25% larger
    m.update(sdlogj=0.4, folding_count=120, folding_percent=0.05, version="0.1.0")
    (root / "p0003" / "metrics.json").write_text(json.dumps(m))
    m7 = json.loads((root / "p0007" / "metrics.json").read_text())
    m7["config"]["model"]["lr"] = 0.003
    (root / "p0007" / "metrics.json").write_text(json.dumps(m7))
    flags = cohort_flags(load_cohort(root))
    kinds = [f.kind for f in flags["p0003"]]
    assert kinds == ["affine_outlier", "sdlogj", "folds", "version"], kinds
    assert "affine scale 1.250" in flags["p0003"][0].text and "120 voxels" in flags["p0003"][2].text
    assert sum(bool(v) for v in flags.values()) == 1
    html = _page(write_report(root))
    assert "mixes results of 2 versions" in html and "mixes 2 run configurations" in html and "model.lr=0.003" in html


def test_page_is_self_contained_and_names_labels(cohort_dir: Path, tmp_path: Path) -> None:
    tsv = tmp_path / "labels.tsv"
    tsv.write_text("index\tname\n2\tLeft-Cerebral-White-Matter\n17\tLeft-Hippocampus\n")
    page = write_report(cohort_dir, labels_tsv=tsv)
    html = _page(page)
    assert page == cohort_dir / "report.html"
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing from the network
    assert html.count('<svg class="plot"') == 3 and "Left-Hippocampus (17)" in html and ">3</text>" in html
    assert html.count('loading="lazy"') == 18  # a thumbnail per completed pair, fetched when visible
    assert 'href="p0000/"' in html and 'src="p0000/qc.png"' in html
    assert "18 done" not in html and "<b>18</b> done" in html and "<b>1</b> failed" in html and "<b>1</b> pending" in html


@pytest.mark.parametrize("case", ["empty", "missing", "only_halfway", "bad_json", "single_result"])
def test_bad_folders_get_a_message_or_a_marked_row(tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "run"
    if case != "missing":
        folder.mkdir()
    if case == "only_halfway":
        (folder / "a" / "logs").mkdir(parents=True)
    if case == "bad_json":
        synthetic_cohort(folder, 1, broken=False)
        (folder / "b").mkdir()
        (folder / "b" / "metrics.json").write_text('{"dice_after": 0.8,')
    if case == "single_result":
        (folder / "metrics.json").write_text(json.dumps(_metrics(np.random.default_rng(0), 0)))
    status = main(["report", str(folder)])
    err = capsys.readouterr().err
    if case in ("empty", "missing"):
        assert status == 2 and str(folder) in err and "Traceback" not in err
        assert ("does not exist" if case == "missing" else "no registration results") in err
        return
    assert status == 0, err
    html = _page(folder / "report.html")
    if case == "only_halfway":
        assert 'class="pending" data-id="a"' in html and "no metrics.json yet" in html
    elif case == "bad_json":
        assert 'class="pending" data-id="b"' in html and "unreadable" in html
    else:
        assert _table_ids(html) == ["."] and "<b>1</b> done" in html


def test_report_follows_a_running_cohort(tmp_path: Path) -> None:
    """A pair being redone (metrics.json removed) reads as pending; when it finishes, the report says so."""
    root = synthetic_cohort(tmp_path / "c", 6, broken=False)
    saved = (root / "p0002" / "metrics.json").read_text()
    (root / "p0002" / "metrics.json").unlink()
    assert "<b>1</b> pending" in _page(write_report(root))
    (root / "p0002" / "metrics.json").write_text(saved)
    assert "<b>0</b> pending" in _page(write_report(root))


def test_thousand_pairs_render_fast_and_small(tmp_path: Path) -> None:
    root = synthetic_cohort(tmp_path / "big", 1000)
    t0 = time.perf_counter()
    page = write_report(root)
    seconds = time.perf_counter() - t0
    size = page.stat().st_size
    assert size < 2_000_000, size
    assert seconds < 10, seconds  # about 1 s alone; 2 shared cores under load
    assert len(_table_ids(_page(page))) == 1004


def test_cli_report_output_and_labels_options(cohort_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(cohort_dir), "--output", str(tmp_path / "r.html")]) == 0
    html = _page(tmp_path / "r.html")
    assert 'href="out/p0000/"' in html  # links from where the page is
    assert main(["report", str(cohort_dir), "--labels", str(tmp_path / "nope.tsv")]) == 2
    assert "nope.tsv" in capsys.readouterr().err
    with pytest.raises(InputError, match="is a folder"):
        write_report(cohort_dir, output=tmp_path)


class _FakeRun:
    def __init__(self) -> None:
        self.logged: list[dict[str, Any]] = []

    def log(self, data: dict[str, Any]) -> None:
        self.logged.append(data)


def test_log_cohort_table_to_a_run_or_logger(cohort_dir: Path) -> None:
    run = _FakeRun()
    assert log_cohort_table(cohort_dir, run) == 20
    table = run.logged[0]["cohort/pairs"]
    cols = list(table.columns)
    data = table.data
    assert cols[:4] == ["id", "status", "severity", "flags"] and cols[-1] == "qc"
    assert [r[0] for r in data[:3]] == ["failed", "swapped", "foreign"]
    assert "look swapped" in data[1][3] and data[0][-1] is None and type(data[1][-1]).__name__ == "Image"

    class Logger:  # a WandbLogger's shape: the run is its experiment
        experiment = _FakeRun()

    assert log_cohort_table(cohort_dir, Logger(), images=False) == 20
    assert log_cohort_table(cohort_dir, type("Disabled", (), {"disabled": True})()) == 0


@pytest.mark.slow  # wandb.init starts its service process: about 10 s
def test_log_cohort_table_offline_run(cohort_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run = wandb.init(project="nir-report-test", dir=str(tmp_path), mode="offline")
    try:
        assert log_cohort_table(cohort_dir, run) == 20
    finally:
        run.finish()
    files = [p for p in (tmp_path / "wandb").rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files)
    assert any("cohort" in p.as_posix() and p.name.endswith("table.json") for p in files), [p.name for p in files][:20]


def test_module_import_leaves_wandb_alone() -> None:
    import subprocess
    import sys

    code = "import sys, nir_lightning.app.report as r; print('wandb' in sys.modules, 'pytorch_lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]  # nor Lightning: `nir report` starts in a second


def copy_qc(src: Path, root: Path) -> None:
    """Put a real QC figure into every completed pair of a synthetic cohort (for screenshots)."""
    for d in root.iterdir():
        if (d / "qc.png").is_file():
            shutil.copyfile(src, d / "qc.png")
