"""The affine stage in a second process, while ``nir register`` imports Lightning (issue 25).

A fresh ``nir register`` imports torch, MONAI and Lightning (which imports ``torch._dynamo``),
builds the LightningCLI, loads the pair and runs the affine stage, all on one core: the second core
idled through the imports and the stage (1-2 s at 2 mm). :class:`EarlyStart` reorders that: before
torch, it starts a second Python process (:class:`StageProcess`); right after torch and MONAI, the command loads the pair with the options the command line implies
(``--data.*`` defaults otherwise) and hands the stage's inputs (tensors, in a temporary file) to
that process (``python -m nir_lightning.app.early_affine``), which has imported only torch
and :mod:`nir_lightning.alignment` (no MONAI, no Lightning, no ``torch._dynamo``:
:mod:`nir_lightning.alignment.adam`) and runs the stage with the options of ``--affine``, else
:class:`~nir_lightning.alignment.AffineStage`'s defaults, while the command imports Lightning and
parses its configuration. The data module then takes the pair (:meth:`EarlyStart.pair_for`) and the
stage's result (:meth:`EarlyStart.take`) only if the parsed configuration asks for exactly that
loading and that stage; otherwise it loads and aligns as before, and the process is stopped. The
stage is deterministic (its own seeded generators, one thread: :mod:`nir_lightning.alignment.cpu`),
so its matrix is the one the command would compute, bit for bit (``tests/app/test_early_affine.py``).

It runs only where it can overlap: a command on two or more threads (so two usable cores), and
Lightning not imported yet (a fresh command; ``register-many`` and notebooks import it once and
gain nothing). If the second
process fails, the command runs the stage itself. ``NIR_EARLY_AFFINE=0`` turns it off, ``1``
forces it and waits for it however late it begins (tests).

Protocol: the command writes JSON lines to the process's stdin (its threads, then a request naming
the stage's options and the inputs' file once the pair is loaded); the process answers ``stage`` on
its stdout when it begins the stage (a command that finds no such line when it needs the matrix, the process still
importing, stops it and runs the stage itself: never slower than without it) and then one JSON
line (floats as Python writes them: exact round trips of the float64 matrices).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nir_lightning.app.startup import package_python_path
from nir_lightning.app.threads import usable_cores
from nir_lightning.data.checks import DEFAULT_PERCENTILES

if TYPE_CHECKING:
    from nir_lightning.alignment import AffineResult, AffineStage
    from nir_lightning.data.pair import ImagePair

__all__ = ["EarlyStart", "StageProcess", "config_changes_stage", "default_source", "result_from_json", "result_to_json", "start", "wanted"]

ENV = "NIR_EARLY_AFFINE"


def wanted(threads: int) -> bool:
    """Whether a second process would overlap the command's imports on a core the command may use:
    it runs on ``threads`` >= 2 threads (a command held to one thread, e.g. a ``register-many``
    worker beside others, leaves the other cores to them) and Lightning is not imported yet
    (``NIR_EARLY_AFFINE`` overrides)."""
    flag = os.environ.get(ENV, "").strip()
    if flag in ("0", "1"):
        return flag == "1"
    return threads >= 2 and usable_cores() >= 2 and "pytorch_lightning" not in sys.modules


def config_changes_stage(configs: list[str], overrides: list[str]) -> bool:
    """Whether config files or ``--data.*`` overrides set the affine stage or the loading's
    percentiles: the early stage would then be the wrong one (a cheap look before the real parse,
    which still decides: :meth:`EarlyStart.take` compares the parsed values).

    >>> config_changes_stage([], ["--trainer.max_steps=10"]), config_changes_stage([], ["--data.affine.lr=0.01"])
    (False, True)
    """
    import yaml

    keys = ("--data.affine", "--data.percentiles", "--data.init_args.affine", "--data.init_args.percentiles", "--data=", "--data ")
    if any(str(arg).startswith(keys) or str(arg) == "--data" for arg in overrides):
        return True
    for cfg in configs:
        try:
            data = (yaml.safe_load(Path(cfg).read_text()) or {}).get("data") or {}
            data = data.get("init_args", data)
            if "affine" in data or tuple(data.get("percentiles", DEFAULT_PERCENTILES)) != DEFAULT_PERCENTILES:
                return True
        except Exception:  # noqa: BLE001 -- unreadable or unexpected: the real parse reports it
            return True
    return False


def start(
    *, demo: bool, affine: str | None, resume: bool, configs: list[str], overrides: list[str], threads: int,
) -> EarlyStart | None:
    """:class:`EarlyStart` for ``nir register``'s options, where it can help (see the module
    docstring): not for the demo, ``--affine none``, ``--resume``, or a config that sets the stage."""
    if demo or affine == "none" or resume or not wanted(threads) or config_changes_stage(configs, overrides):
        return None
    try:
        return EarlyStart(stage={} if affine is None else {"kind": affine}, threads=threads)
    except (OSError, ValueError):  # no interpreter to start (an embedded Python): the stage runs here
        return None


def default_source(
    *, fixed: str, moving: str, fixed_labels: str | None, moving_labels: str | None, labels: str | None, masks: dict[str, str],
) -> dict[str, Any]:
    """What the data module loads by default from these files (:meth:`~nir_lightning.training.PairDataModule.load_source`)."""
    return {
        "fixed": fixed, "moving": moving, "fixed_labels": fixed_labels, "moving_labels": moving_labels, "labels": labels,
        "percentiles": DEFAULT_PERCENTILES, "fixed_mask": masks.get("fixed"), "moving_mask": masks.get("moving"),
        "stage_aligns": True,
    }


class StageProcess:
    """A second Python process that runs affine stages on request (one at a time, in order).

    It imports torch and :mod:`nir_lightning.alignment` as soon as it starts; each request names
    the stage's options and a file of its inputs; it answers ``stage`` when it begins and then the
    result (one JSON line), and serves requests until its stdin closes.

    Args:
        threads: torch's threads in it (the stage itself runs on one).
    """

    def __init__(self, *, threads: int) -> None:
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [sys.executable, "-m", "nir_lightning.app.early_affine"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env={**os.environ, ENV: "0", "OMP_NUM_THREADS": str(int(threads)), "PYTHONPATH": package_python_path()},
        )
        self._send({"threads": int(threads)})

    def request(self, stage: dict[str, Any], inputs: Path) -> None:
        """Ask for ``AffineStage(**stage).fit`` on the tensors saved in ``inputs`` (the process removes the file)."""
        self._send({"stage": stage, "inputs": str(inputs)})

    def began(self) -> bool:
        """Whether it has begun the oldest request not answered yet (without waiting, where the
        platform can tell: ``select`` on a pipe, POSIX)."""
        proc = self._proc
        if proc is None or proc.stdout is None:
            return False
        try:
            import select

            ready = select.select([proc.stdout], [], [], 0)[0]
        except (ImportError, OSError, ValueError):
            ready = [proc.stdout]
        return bool(ready) and proc.stdout.readline().strip() == b"stage"

    def result(self) -> dict[str, Any] | None:
        """The answer to the oldest request (waiting for it); ``None`` if the process failed (it is then stopped)."""
        proc = self._proc
        if proc is None or proc.stdout is None:
            return None
        while True:
            line = proc.stdout.readline()
            if not line:  # ended without an answer
                self.stop()
                return None
            if line.strip() != b"stage":
                try:
                    return dict(json.loads(line))
                except ValueError:
                    self.stop()
                    return None

    def stop(self) -> None:
        """End the process (at once: a request in progress is dropped)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    _close(stream)

    def _send(self, message: dict[str, Any]) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None:
            return
        try:
            proc.stdin.write((json.dumps(message) + "\n").encode())
            proc.stdin.flush()
        except OSError:  # the process is gone: result() sees it
            pass


class EarlyStart:
    """One pair loaded early, and its affine stage run by a :class:`StageProcess`.

    ``nir register`` makes one before it imports torch, so that the second process imports torch
    and the stage meanwhile; :meth:`load` (after torch) then loads the pair and hands the stage's
    inputs over.

    Args:
        stage: :class:`~nir_lightning.alignment.AffineStage` keyword arguments (``{}``: its defaults).
        threads: torch's threads in the second process (the stage itself runs on one).
    """

    def __init__(self, *, stage: dict[str, Any], threads: int) -> None:
        self.stage = dict(stage)
        self.patient = os.environ.get(ENV, "").strip() == "1"  # forced (tests): waits however late it begins
        self.source: dict[str, Any] | None = None
        self._pair: ImagePair | None = None
        self._inputs: Path | None = None
        self._process: StageProcess | None = StageProcess(threads=threads)
        self._asked = False

    def load(self, source: dict[str, Any]) -> None:
        """Load the pair (:func:`~nir_lightning.data.load_pair` with ``source`` and ``keep_native``)
        and hand the stage's inputs to the second process.

        Args:
            source: ``load_pair``'s keyword arguments but ``keep_native``, as
                :meth:`~nir_lightning.training.PairDataModule.load_source` gives them.

        Raises:
            InputError: from loading (a bad file), as the data module would raise it.
        """
        import torch

        from nir_lightning.data.pair import load_pair

        self.source = dict(source)
        self._pair = load_pair(**self.source, keep_native=True)
        inputs = self._pair.stage_inputs()
        shm = "/dev/shm"  # memory, where there is one: the inputs are read once, seconds later
        fd, name = tempfile.mkstemp(prefix="nir_stage_", suffix=".pt", dir=shm if os.access(shm, os.W_OK) else None)
        os.close(fd)
        self._inputs = Path(name)
        # tensors only (torch.load's weights_only): the float64 affines as tensors, exactly
        torch.save({k: torch.from_numpy(v) if k.endswith("affine") else v for k, v in inputs.items()}, name)
        if self._process is not None:
            self._process.request(self.stage, self._inputs)
            self._asked = True

    def pair_for(self, source: dict[str, Any]) -> ImagePair | None:
        """The loaded pair if ``source`` is what it was loaded from (once), else ``None`` (and the process stopped)."""
        pair, self._pair = self._pair, None
        if pair is None or source != self.source:
            self.close()
            return None
        return pair

    def take(self, stage: AffineStage, source: dict[str, Any]) -> AffineResult | None:
        """The stage's result, waiting for it, if it is ``stage`` on the pair loaded from ``source``;
        ``None`` otherwise, when the process failed, or (unless patient) when it has not begun yet."""
        from nir_lightning.alignment import AffineStage

        process, asked = self._process, self._asked
        self._process, self._asked = None, False
        try:
            if process is None or not asked or source != self.source or stage != AffineStage(**self.stage):
                return None
            start = time.perf_counter()
            if not self.patient and not process.began():  # still importing (a cold start): computing here is no slower than waiting
                return None
            data = process.result()
            waited = time.perf_counter() - start
            try:
                return None if data is None else result_from_json(data, waited=waited)
            except (ValueError, KeyError, TypeError):
                return None
        finally:
            if process is not None:
                process.stop()
            self.close()

    def close(self) -> None:
        """Stop the process if its result was not taken, and remove the inputs' file."""
        process, self._process = self._process, None
        if process is not None:
            process.stop()
        self._asked = False
        inputs, self._inputs = self._inputs, None
        if inputs is not None:
            inputs.unlink(missing_ok=True)


def _close(stream: Any) -> None:
    try:
        stream.close()
    except OSError:  # a pipe whose reader is gone, with bytes still buffered
        pass


def result_to_json(res: AffineResult) -> dict[str, Any]:
    """:class:`~nir_lightning.alignment.AffineResult` as JSON-ready values (matrices as nested lists)."""
    out = {f.name: getattr(res, f.name) for f in fields(res)}
    out["world"], out["initial"] = res.world.tolist(), res.initial.tolist()
    out["history"] = [asdict(h) for h in res.history]
    return out


def result_from_json(data: dict[str, Any], *, waited: float | None = None) -> AffineResult:
    """The inverse of :func:`result_to_json`, with ``waited`` set."""
    import numpy as np

    from nir_lightning.alignment import AffineResult, LevelHistory

    return AffineResult(
        world=np.asarray(data["world"], dtype=np.float64), kind=str(data["kind"]), seconds=float(data["seconds"]),
        similarity_before=float(data["similarity_before"]), similarity_after=float(data["similarity_after"]),
        history=tuple(LevelHistory(**h) for h in data["history"]), initial=np.asarray(data["initial"], dtype=np.float64),
        waited=waited,
    )


def _main() -> int:
    import gc

    gc.disable()  # the collector would only rescan torch's import objects; each stage's garbage is acyclic
    first = sys.stdin.readline()
    if not first:
        return 0
    import torch

    torch.set_num_threads(int(json.loads(first)["threads"]))
    from nir_lightning.alignment import AffineStage

    for line in sys.stdin:  # one request a line, once the command has loaded its pair
        request = json.loads(line)
        path = Path(request["inputs"])
        inputs = torch.load(path, weights_only=True)
        path.unlink(missing_ok=True)  # read: nothing left behind if the command is killed from here on
        inputs = {k: v.numpy() if k.endswith("affine") else v for k, v in inputs.items()}
        sys.stdout.write("stage\n")  # begun: the command waits for it from here on
        sys.stdout.flush()
        res = AffineStage(**request["stage"]).fit(**inputs)
        sys.stdout.write(json.dumps(result_to_json(res)) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
