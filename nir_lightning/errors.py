"""Errors whose message is written for the user: ``nir`` prints them without a traceback.

Each message names the file, option or value at fault, the problem, and how to fix it.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import re
from collections.abc import Iterable, Sequence


class NIRError(Exception):
    """Base class of the errors ``nir`` reports as ``nir: error: <message>``."""


class InputError(NIRError, ValueError):
    """A user-supplied file, value or option is unusable; the message says what and how to fix it."""


class OutputError(NIRError, OSError):
    """An output could not be written (disk full, no permission); earlier files are left intact."""


# -- configuration errors from jsonargparse ------------------------------------------------------------
COMMANDS = ("register", "register-many", "compare", "fit", "validate", "test", "predict")
_UNKNOWN_PATTERNS = (
    re.compile(r"unrecognized arguments: (?P<args>.+)"),
    re.compile(r"Group '(?P<group>[\w.]+)' does not accept option '(?P<key>[\w.]+)'"),
    re.compile(r"Parser key \"(?P<group>[\w.]+)\":\s+Problem with given class_path '(?P<cls>[\w.]+)':\s+Option '(?P<key>[\w.]+)' is not accepted"),
)


def _class_keys(cls: type, prefix: str) -> list[str]:
    try:
        params = inspect.signature(cls.__init__).parameters
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
