"""``nir compare``: table values from known files, the Dice-vs-SDlogJ scatter, and two tiny real runs."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import matplotlib.image as mpimg
import pytest
import yaml
from matplotlib.colors import to_hex

from nir_lightning.app.compare import (
    RunRecord,
    compare_table,
    format_table,
    load_runs,
    pareto_points,
    plot_curves,
    plot_pareto,
    read_metrics_csv,
    run_styles,
)
from nir_lightning.cli import main
from nir_lightning.training.lightning_cli import NIRCLI

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

CSV_A = """epoch,lr-Adam/field,step,time/seconds,train/loss,val/dice,val/folding_percent,val/lncc
,0.001,1,,,,,
0,,1,0.5,-0.20,,,
0,,3,1.0,-0.30,,,
0,,3,,,0.40,0.10,-0.35
0,,5,2.0,-0.45,,,
0,,5,,,0.55,0.05,-0.50
"""
CSV_B = """epoch,step,time/seconds,train/loss,val/dice,val/folding_percent,val/lncc
0,1,0.25,-0.10,,,
0,3,0.50,-0.25,,,
0,3,,,0.30,0.00,-0.20
"""


def _write_run(folder: Path, metrics_csv: str, lam: float, sampler: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_text(metrics_csv)
    cfg = {"model": {"lam": lam, "lr": 1e-4, "field": {"class_path": "nir_lightning.fields.DisplacementField"},
                     "sampler": {"class_path": f"nir_lightning.sampling.{sampler}"}}}  # fmt: skip
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    return folder


@pytest.fixture
def two_runs(tmp_path: Path) -> list[Path]:
    a = _write_run(tmp_path / "a" / "version_0", CSV_A, 10.0, "DownsizeSampler")
    b = _write_run(tmp_path / "b" / "version_0", CSV_B, 2.5, "RandomSampler")
    (b / "summary.json").write_text(json.dumps({"steps": 4, "seconds_fit": 0.75, "val/dice": 0.31}))
    return [a, b]


def test_table_values_from_files(two_runs: list[Path]) -> None:
    runs = load_runs(two_runs)
    assert [r.name for r in runs] == ["a/version_0", "b/version_0"]
    rows = compare_table(runs)
    assert list(rows[0]) == ["run", "field", "sampler", "lam", "lr", "steps", "seconds_fit", "train/loss",
                             "val/lncc", "val/dice", "val/folding_percent"]  # fmt: skip
    a, b = rows
    assert (a["sampler"], a["lam"], a["field"]) == ("DownsizeSampler", 10.0, "DisplacementField")
    # last logged values; steps = last 0-based step + 1; seconds from time/seconds
    assert (a["steps"], a["seconds_fit"], a["train/loss"], a["val/dice"], a["val/lncc"]) == (6.0, 2.0, -0.45, 0.55, -0.50)
    assert a["val/folding_percent"] == 0.05
    # summary.json overrides the curves
    assert (b["steps"], b["seconds_fit"], b["val/dice"], b["train/loss"]) == (4.0, 0.75, 0.31, -0.25)
    assert (b["sampler"], b["lam"]) == ("RandomSampler", 2.5)
    text = format_table(rows).splitlines()
    assert text[0].split() == list(rows[0])
    assert text[1].split()[:5] == ["a/version_0", "DisplacementField", "DownsizeSampler", "10", "0.0001"]
    assert text[2].split()[-4:] == ["-0.25", "-0.2", "0.31", "0"]


def test_register_output_metrics_json_wins(tmp_path: Path) -> None:
    out = tmp_path / "reg"
    _write_run(out / "logs" / "version_0", CSV_B, 1.0, "MinipatchSampler")
    (out / "metrics.json").write_text(json.dumps({"dice_before": 0.5, "dice_after": 0.7, "folding_percent": 0.01, "steps": 4,
                                                  "seconds_fit": 3.5, "dice_per_label": {"2": 0.9}, "device": "cpu",
                                                  "config": {"model": {"lam": 20.0}}}))  # fmt: skip
    (row,) = compare_table(load_runs([out]))
    assert (row["run"], row["lam"], row["steps"], row["seconds_fit"]) == ("reg", 20.0, 4.0, 3.5)
    assert (row["dice_before"], row["dice_after"], row["folding_percent"], row["val/dice"]) == (0.5, 0.7, 0.01, 0.30)


def test_curves_and_plot(two_runs: list[Path], tmp_path: Path) -> None:
    curves = read_metrics_csv(two_runs[0] / "metrics.csv")
    steps, values = curves["val/dice"]
    assert steps.tolist() == [3.0, 5.0] and values.tolist() == [0.40, 0.55]
    assert curves["lr-Adam/field"][1].tolist() == [0.001]
    runs = load_runs(two_runs)
    fig = plot_curves(runs, tmp_path / "c.png", x="time")
    assert [ax.get_title() for ax in fig.axes] == ["train/loss", "val/dice", "val/folding_percent", "val/lncc"]
    dice_a = fig.axes[1].lines[0]
    assert dice_a.get_xdata().tolist() == [1.0, 2.0]  # val steps 3, 5 at the train clock's 1.0 s, 2.0 s
    assert mpimg.imread(tmp_path / "c.png").shape[:2] == (256, 4 * 320)


def test_missing_folder_is_an_input_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", str(tmp_path / "nope")]) == 2
    assert "run folder not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "none of the listed folders holds a run" in err and "no metrics.csv" in err and "empty" in err


def test_colours_are_per_run_in_every_panel(two_runs: list[Path], tmp_path: Path) -> None:
    # a first run with no val/* curves: panels that lack a run must not shift the others' colours
    only_loss = _write_run(tmp_path / "c" / "version_0", "step,train/loss\n1,-0.1\n2,-0.2\n", 1.0, "RandomSampler")
    runs = load_runs([only_loss, *two_runs])
    styles = run_styles(runs)
    assert [styles[r.name]["color"] for r in runs] == ["#1f77b4", "#ff7f0e", "#2ca02c"]  # tab10, in run order
    fig = plot_curves(runs)
    panels = fig.axes
    assert [ax.get_title() for ax in panels] == ["train/loss", "val/dice", "val/folding_percent", "val/lncc"]
    assert [[ln.get_label() for ln in ax.lines] for ax in panels] == [["c/version_0", "a/version_0", "b/version_0"]] + 3 * [
        ["a/version_0", "b/version_0"]
    ]
    (legend,) = fig.legends
    legend_colour = {t.get_text(): to_hex(h.get_color()) for t, h in zip(legend.get_texts(), legend.legend_handles, strict=True)}
    assert list(legend_colour) == ["c/version_0", "a/version_0", "b/version_0"]
    for ax in panels:
        for line in ax.lines:  # one colour per run, the same in every panel and in the legend
            assert to_hex(line.get_color()) == styles[line.get_label()]["color"] == legend_colour[line.get_label()]
    assert len({to_hex(ln.get_color()) for ax in panels for ln in ax.lines}) == 3
    eleven = [RunRecord(Path(str(i)), str(i)) for i in range(11)]  # the 11th run reuses colour 1, dashed
    assert run_styles(eleven)["10"] == {"color": "#1f77b4", "linestyle": "--"} and run_styles(eleven)["0"]["linestyle"] == "-"


def test_empty_folder_among_runs_is_skipped_with_a_warning(two_runs: list[Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    empty = tmp_path / "leftover"
    (empty / "logs" / "version_0").mkdir(parents=True)  # an interrupted run: folders, no files
    header_only = _write_run(tmp_path / "killed" / "version_0", "epoch,step,train/loss\n", 1.0, "RandomSampler")
    plot = tmp_path / "cmp.png"
    assert main(["compare", str(two_runs[0]), str(empty), str(header_only), str(two_runs[1]), "--plot", str(plot)]) == 0
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 2
    assert f"'{empty}'" in warnings[0] and "no metrics.csv" in warnings[0]
    assert f"'{header_only}'" in warnings[1] and "no logged values" in warnings[1]
    table = out.splitlines()
    assert [line.split()[0] for line in table[1:3]] == ["a/version_0", "b/version_0"] and len(table) == 4  # + "curves written"
    assert plot.is_file()
    # a folder holding only summary.json is a run (final values, no curves)
    summary_only = tmp_path / "wandb_only"
    summary_only.mkdir()
    (summary_only / "summary.json").write_text(json.dumps({"steps": 7, "val/dice": 0.42}))
    (row,) = compare_table(load_runs([summary_only]))
    assert (row["run"], row["steps"], row["val/dice"]) == ("wandb_only", 7.0, 0.42)


def test_nir_compare_on_two_tiny_runs(tiny_pair: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["nir"])
    dirs = []
    for name, lam in (("lam1", 1.0), ("lam20", 20.0)):
        args = [
            "-c", str(CONFIGS / "logger" / "csv.yaml"),
            f"--data.fixed={tiny_pair['fixed']}", f"--data.moving={tiny_pair['moving']}",
            f"--data.fixed_labels={tiny_pair['fixed_labels']}", f"--data.moving_labels={tiny_pair['moving_labels']}",
            "--data.steps_per_epoch=3", "--trainer.max_steps=6", "--trainer.log_every_n_steps=1",
            "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.logger.init_args.name={name}",
            "--model.field.init_args.width=32", f"--model.lam={lam}", "--trainer.callbacks.init_args.every_n_steps=0",
        ]  # fmt: skip
        cli = NIRCLI(args, run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        dirs.append(Path(cli.trainer.logger.log_dir))  # type: ignore[union-attr]
    plot, table = tmp_path / "cmp.png", tmp_path / "cmp.csv"
    assert main(["compare", str(tmp_path / "lam1"), str(tmp_path / "lam20"), "--plot", str(plot), "--csv", str(table)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].split()[0] == "lam1" and printed[2].split()[0] == "lam20"
    with open(table, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row, folder, lam in zip(rows, dirs, (1.0, 20.0), strict=True):
        with open(folder / "metrics.csv", newline="") as fh:
            logged = list(csv.DictReader(fh))
        last = {k: [float(r[k]) for r in logged if r[k]][-1] for k in ("train/loss", "val/dice", "val/lncc", "val/folding_percent")}
        assert float(row["lam"]) == lam and float(row["steps"]) == 6
        for key, value in last.items():
            assert float(row[key]) == pytest.approx(value, rel=1e-6), key
        assert float(row["seconds_fit"]) == json.loads((folder / "summary.json").read_text())["seconds_fit"]
    assert mpimg.imread(plot).shape[:2] == (256, 4 * 320)


def _reg_folder(folder: Path, **metrics: float) -> Path:
    """A ``nir register`` output folder reduced to its metrics.json."""
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"device": "cpu", "dice_per_label": {"2": 0.9}, **metrics}))
    return folder


def test_pareto_scatter_of_two_result_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    a = _reg_folder(tmp_path / "alpha1", dice_after=0.80, dice_after_label=0.81, sdlogj=0.10, folding_count=3,
                    folding_percent=0.001, hd95_after=2.5, seconds_fit=12.0)  # fmt: skip
    b = _reg_folder(tmp_path / "alpha3", dice_after=0.76, dice_after_label=0.78, sdlogj=0.05, folding_count=0,
                    folding_percent=0.0, hd95_after=2.9, seconds_fit=11.0)  # fmt: skip
    png, table = tmp_path / "pareto.png", tmp_path / "t.csv"
    assert main(["compare", str(a), str(b), "--pareto", str(png), "--csv", str(table), "--columns", "dice_after,hd95_after"]) == 0
    out = capsys.readouterr().out.splitlines()
    # the table gains what the scatter shows, and the folds
    assert out[0].split() == ["run", "dice_after", "hd95_after", "sdlogj", "folding_count"]
    assert out[1].split() == ["alpha1", "0.8", "2.5", "0.1", "3"] and out[2].split() == ["alpha3", "0.76", "2.9", "0.05", "0"]
    assert out[-1] == f"nir compare: Dice vs SDlogJ written to {png}"
    assert png.stat().st_size > 1000 and mpimg.imread(png).shape[2] in (3, 4)
    assert not (tmp_path / "compare.png").exists()  # with --pareto the curves plot is opt-in (these folders have none)
    points = pareto_points([a, b], load_runs([a, b]))
    fig, notes = plot_pareto(points)
    assert notes == [] and [ax.get_title() for ax in fig.axes] == ["Dice (nearest neighbour) vs SDlogJ", "Dice (label interpolation) vs SDlogJ"]
    nn, lab = fig.axes
    assert [(ln.get_label(), ln.get_xdata().tolist(), ln.get_ydata().tolist()) for ln in nn.lines] == [
        ("alpha1", [0.10], [0.80]), ("alpha3", [0.05], [0.76])
    ]  # fmt: skip
    assert [ln.get_ydata().tolist() for ln in lab.lines] == [[0.81], [0.78]]
    assert [t.get_text() for t in nn.texts] == ["alpha1", "alpha3"]  # each point labelled with its folder
    # a benchmark result folder names its label-interpolation Dice dice_onehot_linear; without either: one panel
    c = _reg_folder(tmp_path / "bench" / "ants", dice_after=0.7, dice_onehot_linear=0.72, sdlogj=0.2)
    d = _reg_folder(tmp_path / "nolab", dice_after=0.7, sdlogj=0.2)
    assert plot_pareto(pareto_points([c], load_runs([c])))[0].axes[1].lines[0].get_ydata().tolist() == [0.72]
    fig, notes = plot_pareto(pareto_points([d], load_runs([d])))
    assert len(fig.axes) == 1 and "Dice (label interpolation)" in notes[0]


def test_pareto_input_errors_name_the_folder(two_runs: list[Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    good = _reg_folder(tmp_path / "good", dice_after=0.8, sdlogj=0.1)
    png = str(tmp_path / "p.png")
    assert main(["compare", str(good), str(tmp_path / "nope"), "--pareto", png]) == 2
    assert f"run folder not found: '{tmp_path / 'nope'}'" in capsys.readouterr().err
    # a CSV-logger folder is a run for the curves, but has no metrics.json for the scatter
    assert main(["compare", str(good), str(two_runs[0]), "--pareto", png]) == 2
    err = capsys.readouterr().err
    assert f"'{two_runs[0]}' has none" in err and "metrics.json" in err
    no_sd = _reg_folder(tmp_path / "nosd", dice_after=0.8)
    assert main(["compare", str(good), str(no_sd), "--pareto", png]) == 2
    assert f"'{no_sd / 'metrics.json'}' lacks sdlogj" in capsys.readouterr().err
    assert not Path(png).exists()


def test_pareto_figure_joins_each_groups_front_and_draws_dominated_settings_hollow() -> None:
    from nir_lightning.app.compare.pareto import ParetoPoint, pareto_front

    assert pareto_front([0.1, 0.15, 0.2, 0.2], [0.80, 0.70, 0.84, 0.83]) == [0, 2]
    assert pareto_front([0.3, 0.1], [0.9, 0.5]) == [1, 0]  # any input order; the front in SDlogJ order
    pts = [ParetoPoint("nir", name, {"sdlogj": x, "dice_after": y}) for name, x, y in (("a", 0.10, 0.80), ("b", 0.15, 0.70), ("c", 0.20, 0.84))]
    fig, _ = plot_pareto(pts)
    (ax,) = fig.axes
    line, hollow = ax.lines
    assert (line.get_xdata().tolist(), line.get_ydata().tolist(), line.get_linestyle()) == ([0.10, 0.20], [0.80, 0.84], "-")
    assert (hollow.get_xdata().tolist(), hollow.get_ydata().tolist(), hollow.get_linestyle()) == ([0.15], [0.70], "None")
    assert hollow.get_markerfacecolor() == "none" and hollow.get_label() == "_dominated"
    assert [t.get_text() for t in ax.texts] == ["a", "b", "c"]  # every setting still labelled
