"""W&B and CSV logging through ``configs/logger/*.yaml``, read back from the files they write.

An offline W&B run is a folder with a transaction log ``run-<id>.wandb``: a LevelDB-style log
(7-byte file header, 32 KiB blocks, records split into chunks) of protobuf ``Record``s, the
format ``wandb sync`` uploads. :func:`read_wandb_run` parses it with wandb's own protobuf
classes, so the tests see exactly what would be uploaded.
"""

from __future__ import annotations

import csv
import json
import struct
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import matplotlib.image as mpimg
import pytest

from nir_lightning.cli import main
from nir_lightning.evaluation.qc import FOOTER_INCHES, PANEL_INCHES
from nir_lightning.training.callbacks import ThrottledProgressBar
from nir_lightning.training.lightning_cli import NIRCLI
from nir_lightning.training.tracking import QCLogger, wandb_run

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
STEPS, EPOCH = 8, 4  # validation (and a QC image) after steps 4 and 8
QC_SHAPE = (round((3 * PANEL_INCHES + FOOTER_INCHES) * 80), round(8 * PANEL_INCHES * 80))  # 8 panels, dpi 80
TRAIN_KEYS = {"train/loss", "train/lncc", "train/jedt", "lr-Adam/field", "time/seconds"}
VAL_KEYS = {"val/lncc", "val/dice", "val/folding_percent"}
WANDB_INTERNAL = {"_runtime", "_step", "_timestamp", "trainer/global_step", "epoch"}


@pytest.fixture(autouse=True)
def _fresh_wandb() -> Any:
    """Each test starts without a W&B run and with wandb's process state (its mode) reset."""
    yield
    import wandb

    wandb.finish()
    wandb.teardown()


def read_wandb_run(run_dir: Path) -> SimpleNamespace:
    """History rows, summary, config, run record and record kinds of an offline run folder."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    chunks: list[bytes] = []
    pos, buf, block = 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too short for a header: zero padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:  # FULL
            chunks.append(payload)
        elif kind == 2:  # FIRST
            buf = payload
        elif kind == 3:  # MIDDLE
            buf += payload
        elif kind == 4:  # LAST
            chunks.append(buf + payload)
        else:
            break
    out = SimpleNamespace(history=[], summary={}, config={}, run=None, kinds=[], artifacts=[])

    def key(item: Any) -> str:
        return "/".join(item.nested_key) or item.key

    for raw in chunks:
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        out.kinds.append(kind)
        if kind == "history":
            out.history.append({key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            out.summary.update({key(u): json.loads(u.value_json) for u in rec.summary.update})
        elif kind == "config":
            out.config.update({key(u): json.loads(u.value_json) for u in rec.config.update})
        elif kind == "run":
            out.run = rec.run
        elif kind == "artifact":
            out.artifacts.append(rec.artifact)
    return out


def wait_for_exit_record(root: Path, timeout: float = 30.0) -> SimpleNamespace:
    """The run folder under ``root/wandb`` once wandb-core has flushed its exit record."""
    deadline = time.monotonic() + timeout
    while True:
        dirs = sorted((root / "wandb").glob("offline-run-*"))
        if len(dirs) == 1:
            try:
                run = read_wandb_run(dirs[0])
                if "exit" in run.kinds:
                    run.dir = dirs[0]
                    return run
            except (ValueError, AssertionError):
                pass
        if time.monotonic() > deadline:
            raise AssertionError(f"no complete offline W&B run under {root / 'wandb'}: {dirs}")
        time.sleep(0.2)


def cli_args(files: dict[str, Path], root: Path, logger: str, *extra: str) -> list[str]:
    return [
        "-c", str(CONFIGS / "logger" / logger),
        f"--data.fixed={files['fixed']}", f"--data.moving={files['moving']}",
        f"--data.fixed_labels={files['fixed_labels']}", f"--data.moving_labels={files['moving_labels']}",
        f"--data.steps_per_epoch={EPOCH}", f"--trainer.max_steps={STEPS}", "--trainer.log_every_n_steps=2",
        "--trainer.accelerator=cpu", f"--trainer.default_root_dir={root}", "--trainer.enable_checkpointing=false",
        "--trainer.enable_model_summary=false", "--trainer.enable_progress_bar=false",
        "--model.field.init_args.width=32", "--model.field.init_args.levels=3", "--model.lam=7.5",
        f"--trainer.logger.init_args.save_dir={root}", *extra,
    ]  # fmt: skip


def fit(args: list[str], monkeypatch: pytest.MonkeyPatch) -> NIRCLI:
    monkeypatch.setattr(sys, "argv", ["nir"])  # LightningCLI warns when sys.argv also holds options
    cli = NIRCLI(args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


def qc_logger(cli: NIRCLI) -> QCLogger:
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, QCLogger)]  # type: ignore[attr-defined]
    return cb


@pytest.fixture(scope="module")
def offline_run(tiny_pair: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    import wandb

    root = tmp_path_factory.mktemp("wandb_offline")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        args = cli_args(tiny_pair, root, "wandb.yaml", "--trainer.logger.init_args.tags=[nir,unit]",
                        "--trainer.logger.init_args.group=g1", "--trainer.logger.init_args.job_type=test")  # fmt: skip
        cli = fit(args, mp)
        qc_steps = list(qc_logger(cli).logged_steps)
        wandb.finish()
        wandb.teardown()  # wandb keeps the mode it was set up with; later tests choose their own
    run = wait_for_exit_record(root)
    run.qc_steps = qc_steps
    run.root = root
    return run


def test_offline_run_has_metric_keys_and_final_summary(offline_run: SimpleNamespace) -> None:
    keys = {k for row in offline_run.history for k in row}
    assert TRAIN_KEYS | VAL_KEYS <= keys
    dice = [row["val/dice"] for row in offline_run.history if "val/dice" in row]
    assert len(dice) == STEPS // EPOCH
    s = offline_run.summary
    assert s["steps"] == STEPS
    assert s["val/dice"] == pytest.approx(dice[-1])
    assert 0 < s["seconds_fit"] < 300
    assert s["time/seconds"] <= s["seconds_fit"]
    assert "exit" in offline_run.kinds


def test_offline_run_has_one_qc_image_per_validation(offline_run: SimpleNamespace) -> None:
    assert offline_run.qc_steps == [EPOCH, STEPS]
    rows = [row for row in offline_run.history if "qc/_type" in row]
    assert [row["qc/captions"] for row in rows] == [[f"step {EPOCH}"], [f"step {STEPS}"]]
    assert all((row["qc/height"], row["qc/width"]) == QC_SHAPE for row in rows)
    pngs = sorted((offline_run.dir / "files" / "media" / "images").glob("qc_*.png"))
    assert len(pngs) == 2
    for png in pngs:
        assert mpimg.imread(png).shape[:2] == QC_SHAPE


def test_offline_run_carries_resolved_config_and_cli_settings(offline_run: SimpleNamespace) -> None:
    cfg = offline_run.config
    assert cfg["model"]["lam"] == 7.5
    assert cfg["model"]["field"]["init_args"]["width"] == 32
    assert cfg["trainer"]["max_steps"] == STEPS
    assert cfg["data"]["steps_per_epoch"] == EPOCH
    run = offline_run.run
    assert list(run.tags) == ["nir", "unit"]
    assert (run.run_group, run.job_type, run.project) == ("g1", "test", "nir_lightning")


def test_csv_logger_gets_the_same_metric_keys(offline_run: SimpleNamespace, tiny_pair: dict[str, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    cli = fit(cli_args(tiny_pair, tmp_path, "csv.yaml"), monkeypatch)
    log_dir = Path(cli.trainer.logger.log_dir)  # type: ignore[union-attr]
    with open(log_dir / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    csv_keys = set(rows[0]) - {"step", "epoch"}
    wandb_keys = {k for row in offline_run.history for k in row} - WANDB_INTERNAL
    assert csv_keys == {k for k in wandb_keys if not k.startswith("qc/")}
    assert sorted(p.name for p in (log_dir / "qc").glob("*.png")) == [f"step_{EPOCH:06d}.png", f"step_{STEPS:06d}.png"]
    assert mpimg.imread(log_dir / "qc" / f"step_{STEPS:06d}.png").shape[:2] == QC_SHAPE
    summary = json.loads((log_dir / "summary.json").read_text())
    dice = [float(r["val/dice"]) for r in rows if r["val/dice"]]
    assert summary["steps"] == STEPS and summary["val/dice"] == pytest.approx(dice[-1])
    assert (log_dir / "config.yaml").is_file()


def test_disabled_wandb_writes_and_renders_nothing(tiny_pair: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cli = fit(cli_args(tiny_pair, tmp_path, "wandb.yaml"), monkeypatch)
    assert cli.trainer.global_step == STEPS
    assert qc_logger(cli).logged_steps == []  # no image rendered for nobody
    assert wandb_run(cli.trainer.logger) is None  # type: ignore[arg-type]
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["config.yaml"]  # LightningCLI's own config copy; nothing from W&B


def test_no_api_key_falls_back_to_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb
    from pytorch_lightning.loggers import WandbLogger

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for var in ("HOME", "WANDB_CONFIG_DIR", "WANDB_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    run = wandb_run(WandbLogger(save_dir=str(tmp_path), project="p"))
    try:
        assert run is not None
        import os

        assert os.environ["WANDB_MODE"] == "offline"
    finally:
        wandb.finish()
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1


def test_register_writes_qc_png_and_attaches_outputs_to_wandb(tiny_pair: dict[str, Path], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "out"
    rc = main([
        "register", "--fixed", str(tiny_pair["fixed"]), "--moving", str(tiny_pair["moving"]),
        "--fixed-labels", str(tiny_pair["fixed_labels"]), "--moving-labels", str(tiny_pair["moving_labels"]),
        "--output", str(out), "-c", str(CONFIGS / "logger" / "wandb.yaml"),
        "--trainer.max_steps=4", "--data.steps_per_epoch=4", f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--model.field.init_args.width=32", "--trainer.callbacks.init_args.log_outputs=true",
    ])  # fmt: skip
    assert rc == 0
    assert mpimg.imread(out / "qc.png").shape[:2] == QC_SHAPE
    metrics = json.loads((out / "metrics.json").read_text())
    run = wait_for_exit_record(tmp_path)  # register finished the run itself
    assert run.summary["dice_after"] == pytest.approx(metrics["dice_after"])
    assert run.summary["steps"] == 4
    (art,) = run.artifacts
    assert art.type == "registration"
    names = {entry.path for entry in art.manifest.contents}
    assert {"metrics.json", "qc.png", "warped.nii.gz", "displacement.nii.gz"} <= names


def test_progress_bar_is_throttled_off_a_terminal(tiny_pair: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = [a for a in cli_args(tiny_pair, tmp_path, "csv.yaml") if "enable_progress_bar" not in a]
    monkeypatch.setattr(sys, "argv", ["nir"])
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    cli = NIRCLI([*args, "--trainer.max_steps=200"], run=False)
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, ThrottledProgressBar)
    bar.setup(cli.trainer, cli.model, "fit")
    assert bar.refresh_rate == 200 // 20
    off = NIRCLI([*args, "--trainer.enable_progress_bar=false"], run=False)
    assert off.trainer.progress_bar_callback is None
