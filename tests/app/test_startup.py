"""The start-up of ``nir register``: which modules importing it loads, and the garbage collector around it."""

from __future__ import annotations

import gc
import json
import subprocess
import sys

import pytest

from nir_lightning.app.startup import StartupCollector

HEAVY = ("pytorch_lightning", "lightning_fabric", "monai", "matplotlib", "wandb")


def _loaded_after(modules: list[str]) -> list[str]:
    """The heavy modules in ``sys.modules`` after importing ``modules`` in a fresh interpreter."""
    code = f"import json, sys\nfor m in {modules!r}: __import__(m)\nprint(json.dumps(sorted(m for m in {HEAVY + ('torch',)!r} if m in sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_register_entry_modules_import_nothing_heavy() -> None:
    """`nir`'s module and the register API load no torch, Lightning, MONAI, matplotlib or W&B:
    a bad option or a missing file is reported in a fraction of a second."""
    assert _loaded_after(["nir_lightning.cli", "nir_lightning.app.cli", "nir_lightning.app.register", "nir_lightning.app.startup"]) == []


def test_monai_matplotlib_and_wandb_load_only_where_they_run() -> None:
    """The pure layers, the dense evaluation and the outputs import torch, not MONAI (only a load onto
    another grid without an affine stage and the phantom import it when they run), nor matplotlib (the QC figure) or W&B;
    the LightningCLI's modules add Lightning, still without MONAI or W&B."""
    pure = ["nir_lightning.data.pair", "nir_lightning.core.smoothing", "nir_lightning.fields", "nir_lightning.alignment",
            "nir_lightning.evaluation.evaluate", "nir_lightning.evaluation.outputs", "nir_lightning.data.phantom"]
    assert _loaded_after(pure) == ["torch"]
    loaded = _loaded_after(["nir_lightning.training.lightning_cli", "nir_lightning.training"])
    assert "pytorch_lightning" in loaded and "monai" not in loaded and "wandb" not in loaded, loaded


def test_startup_collector_restores_the_collector() -> None:
    if not gc.isenabled() or gc.get_freeze_count():
        pytest.skip("the test process manages the collector itself")
    c = StartupCollector.begin()
    assert not gc.isenabled()
    c.end()  # the start-up's objects frozen, collection on for the fit
    assert gc.isenabled() and gc.get_freeze_count() > 0
    c.close()
    assert gc.isenabled() and gc.get_freeze_count() == 0
    c.close()  # twice is harmless
    failed = StartupCollector.begin()
    failed.close()  # a start-up that failed before end(): collection back on, nothing left frozen
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_startup_collector_leaves_a_managed_collector_alone() -> None:
    gc.disable()
    try:
        c = StartupCollector.begin()
        c.end()
        c.close()
        assert not gc.isenabled() and gc.get_freeze_count() == 0
    finally:
        gc.enable()


def test_the_command_line_process_freezes_its_objects_at_exit() -> None:
    """`nir` (main() reading sys.argv) skips the collector's passes of the interpreter's teardown;
    exit handlers registered before it still run after it."""
    code = (
        "import atexit, gc, sys\n"
        "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 0))\n"
        "from nir_lightning.cli import main\n"
        "sys.argv = ['nir', '--help']\n"
        "print('rc', main())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "rc 0" in proc.stdout and "frozen at exit: True" in proc.stdout, proc.stdout
    in_process = subprocess.run(
        [sys.executable, "-c", code.replace("main()", "main(['--help'])")], capture_output=True, text=True, timeout=120, check=True,
    )
    assert "frozen at exit: False" in in_process.stdout, in_process.stdout  # an explicit argv: a caller's process, left alone


def test_collector_off_and_the_rank_collector_after_a_collection(monkeypatch: pytest.MonkeyPatch) -> None:
    """`register-many` imports with the collector off (on again after); after its first pair,
    which `run_pair` ended with a full collection, the rank only freezes (no second full pass)."""
    from nir_lightning.app.startup import RankCollector, collector_off

    if not gc.isenabled() or gc.get_freeze_count():
        pytest.skip("the test process manages the collector itself")
    with collector_off():
        assert not gc.isenabled()
    assert gc.isenabled()
    collections: list[int] = []
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: collections.append(1) or real_collect(*a))
    rank = RankCollector.after_first_pair(collected=True)
    assert collections == [] and gc.get_freeze_count() > 0
    rank.close()
    rank = RankCollector.after_first_pair()
    assert collections == [1]
    rank.close()
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_our_own_freeze_is_known_without_walking_the_frozen_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    """``gc.get_freeze_count()`` walks every frozen object (~25 ms after the imports); while a
    freeze of ours is in force, nothing asks it (``register-many`` asked twice a pair)."""
    from nir_lightning.app import startup

    if not gc.isenabled() or gc.get_freeze_count():
        pytest.skip("the test process manages the collector itself")
    rank = startup.RankCollector.after_first_pair(collected=True)
    try:
        calls: list[int] = []
        monkeypatch.setattr(startup.gc, "get_freeze_count", lambda: calls.append(1) or 1)
        later = startup.StartupCollector.begin()  # a later pair: finds the rank's freeze, leaves the collector alone
        assert not later.managed and gc.isenabled() and calls == []
        later.close()
        monkeypatch.undo()
    finally:
        rank.close()
    assert gc.isenabled() and gc.get_freeze_count() == 0 and startup._OUR_FREEZES == 0
