"""Configuration errors from jsonargparse, turned into one line that names the key and a fix."""

from __future__ import annotations

import argparse
import difflib
import inspect
import re
from collections.abc import Iterable, Sequence

from nir_lightning.errors import InputError

COMMANDS = ("register", "register-many", "apply", "compare", "fit", "validate", "test", "predict")

MOVED_CLASS_PATHS = {
    "nir_lightning.velocity.VelocityField": "nir_lightning.fields.VelocityField",
    "nir_lightning.fields.DisplacementField": "nir_lightning.fields.DisplacementField",
    "nir_lightning.hybrid.HybridSchedule": "model.schedule with class_path nir_lightning.training.HybridSchedule (see configs/model/hybrid.yaml)",
    "nir_lightning.callbacks.NiftiWriter": "nir_lightning.training.NiftiWriter",
    "nir_lightning.logging_callbacks.QCLogger": "nir_lightning.training.QCLogger",
}
"""class_paths of configs written for version 0.1 before the package was split into layers."""
_UNKNOWN_PATTERNS = (
    re.compile(r"unrecognized arguments: (?P<args>.+)"),
    re.compile(r"Group '(?P<group>[\w.]+)' does not accept option '(?P<key>[\w.]+)'"),
    re.compile(r"Parser key \"(?P<group>[\w.]+)\":\s+Problem with given class_path '(?P<cls>[\w.]+)':\s+Option '(?P<key>[\w.]+)' is not accepted"),
)


def _class_keys(cls: type, prefix: str) -> list[str]:
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return []
    return [f"{prefix}.{name}" for name in params if name not in ("self", "args", "kwargs")]


def _import(path: str) -> type | None:
    module, _, name = path.rpartition(".")
    try:
        mod = __import__(module, fromlist=[name])
        obj = getattr(mod, name)
    except (ImportError, AttributeError, ValueError):
        return None
    return obj if isinstance(obj, type) else None


def known_config_keys(model: type, data: type, trainer: type) -> list[str]:
    """Top-level ``model.*``, ``data.*`` and ``trainer.*`` keys (for "did you mean" hints)."""
    return _class_keys(model, "model") + _class_keys(data, "data") + _class_keys(trainer, "trainer") + ["seed_everything"]


def config_error(exc: argparse.ArgumentError | Exception, *, configs: Sequence[str] = (), known: Iterable[str] = ()) -> InputError:
    """Turn a jsonargparse parse error into an :class:`InputError` naming the key and a fix.

    >>> str(config_error(argparse.ArgumentError(None, "unrecognized arguments: --model.lamda=3"), known=["model.lam"]))
    "unknown option 'model.lamda' (on the command line); did you mean 'model.lam'? Run `nir fit --print_config` (with the same -c files) to list every accepted key and its value."
    """
    text = " ".join(str(exc).split())
    if "argument subcommand: invalid choice" in text:
        bad_cmd = re.search(r"invalid choice: '([^']*)'", text)
        return InputError(
            f"unknown command {bad_cmd.group(1)!r}; use one of: {', '.join(COMMANDS)} (`nir <command> --help` lists its options)."
            if bad_cmd else f"{text}; use one of: {', '.join(COMMANDS)}."
        )
    where = f"in {', '.join(repr(c) for c in configs)} or on the command line" if configs else "on the command line"
    for old, new in MOVED_CLASS_PATHS.items():
        if old in text and old != new:
            return InputError(f"the class_path '{old}' ({where}) was renamed: use {new}.")
    fix = "Run `nir fit --print_config` (with the same -c files) to list every accepted key and its value."
    bad: str | None = None
    candidates = list(known)
    for pattern in _UNKNOWN_PATTERNS:
        m = pattern.search(text)
        if not m:
            continue
        groups = m.groupdict()
        if "args" in groups:
            bad = groups["args"].split()[0].split("=")[0].lstrip("-")
        elif groups.get("cls"):
            bad = f"{groups['group']}.init_args.{groups['key']}"
            cls = _import(groups["cls"])
            if cls is not None:
                candidates = _class_keys(cls, f"{groups['group']}.init_args")
        else:
            bad = f"{groups['group']}.{groups['key']}"
        break
    if bad is None:
        return InputError(f"invalid configuration ({where}): {text}. {fix}")
    close = difflib.get_close_matches(bad, candidates, n=1, cutoff=0.75)
    hint = f"; did you mean '{close[0]}'?" if close else "."
    return InputError(f"unknown option '{bad}' ({where}){hint} {fix}")


def union_error_detail(text: str) -> str:
    r"""The one informative line of jsonargparse's "Does not validate against any of the Union
    subtypes" error (an optional class argument whose constructor refused a value), else ``text``.

    >>> text = "Does not validate against any of the Union subtypes\nErrors:\n  - A.b must be >= 1, got 0\n  - Expected a <class 'NoneType'>"
    >>> union_error_detail(text)
    'A.b must be >= 1, got 0'
    """
    if "Does not validate against any of the Union subtypes" not in text:
        return text
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("- ") and "Expected a <class 'NoneType'>" not in line:
            return line[2:].strip()
    return text
