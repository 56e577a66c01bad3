"""The ``nir`` process's start and end: the cyclic garbage collector around a registration's
start-up and at exit, how a rank of ``register-many`` ends (:func:`end_rank_process`), and the
``PYTHONPATH`` of the child processes it starts (:func:`package_python_path`).

Importing PyTorch, Lightning and MONAI creates about half a million objects, and the collector
scans them again and again while they are created (a fifth of the import time: 3.8 s of
imports took 3.0 s without it on the 2-core dev machine), then once more in each full
collection during the fit, and again at interpreter exit (1.3 s of module teardown after those
imports). None of that frees anything that matters: these objects live as long as the process.

:class:`StartupCollector` turns the collector off for the start-up (imports, building the
LightningCLI, loading the pair, the affine stage), then freezes what exists
(:func:`gc.freeze`: later collections skip it) and turns the collector back on for the fit;
:meth:`StartupCollector.close` unfreezes at the end of the registration, so a long Python
session (``register-many``, a notebook) collects a finished registration's objects as before.
A caller that manages the collector itself (disabled, or objects already frozen) is left alone.
:class:`RankCollector` does it once for the rank of ``register-many``: what survives its first
pair (the imports, Lightning's and MONAI's caches) is frozen until the last, so that the full
collection after each later pair, and the collections during its fit, scan only that pair's objects.
:func:`collector_off` covers imports made before a registration's own start-up (``register-many``
imports torch and Lightning before its first pair: 0.6 s more with the collector on).
:func:`freeze_at_exit` makes a command-line process skip the collections of its teardown.
Neither changes a result: the collector only frees memory.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["RankCollector", "StartupCollector", "collector_off", "freeze_at_exit"]


_OUR_FREEZES = 0
"""How many of this module's freezes are in force (a :class:`RankCollector`, a :class:`StartupCollector`
between ``end`` and ``close``): while one is, the objects are known to be frozen without
``gc.get_freeze_count()``, which walks every frozen object (~25 ms after the imports: twice a pair in ``register-many``)."""


def _caller_manages_collector() -> bool:
    """The collector is off, or objects are frozen: someone else manages it, so leave it alone."""
    return not gc.isenabled() or _OUR_FREEZES > 0 or gc.get_freeze_count() > 0


def _freeze() -> None:
    global _OUR_FREEZES
    gc.freeze()
    _OUR_FREEZES += 1


def _unfreeze() -> None:
    global _OUR_FREEZES
    gc.unfreeze()
    _OUR_FREEZES = max(0, _OUR_FREEZES - 1)


@contextmanager
def collector_off() -> Iterator[None]:
    """No cyclic collection inside the block (imports); the collector on again after it, unless the
    caller manages it (off already, or objects frozen: then it is left alone).

    >>> with collector_off():
    ...     inside = gc.isenabled()
    >>> inside, gc.isenabled()
    (False, True)
    """
    if _caller_manages_collector():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class StartupCollector:
    """No cyclic collection from :meth:`begin` to :meth:`end`; what exists then is frozen until :meth:`close`.

    >>> before = gc.isenabled(), gc.get_freeze_count()
    >>> c = StartupCollector.begin()
    >>> c.end(); c.close()
    >>> (gc.isenabled(), gc.get_freeze_count()) == before
    True
    """

    def __init__(self, *, managed: bool) -> None:
        self.managed = managed
        self.frozen = False
        self.ended = not managed

    @classmethod
    def begin(cls) -> StartupCollector:
        """Turn the collector off, unless the caller manages it (already off, or objects frozen)."""
        managed = not _caller_manages_collector()
        if managed:
            gc.disable()
        return cls(managed=managed)

    def end(self) -> None:
        """Freeze what the start-up created and turn the collector back on (once; before the fit)."""
        if self.ended:
            return
        self.ended = True
        _freeze()
        self.frozen = True
        gc.enable()

    def close(self) -> None:
        """The registration is over (or failed): the collector on, and the frozen objects collectable again."""
        self.end()
        if self.frozen:
            _unfreeze()
            self.frozen = False


class RankCollector:
    """``register-many``: after the rank's first pair, collect once and freeze the survivors (the
    imports and the caches that live as long as the process) until :meth:`close`.

    Each pair ends with a full collection (``run_pair``); without this one, every such collection
    scanned the ~0.5 million objects of the imports again (0.2 s a pair on the 2-core dev machine).
    Later pairs' :class:`StartupCollector` finds objects frozen and leaves the collector on: their
    start-up creates few objects, the imports being done. A caller that manages the collector
    itself (disabled, or objects already frozen) is left alone.

    >>> before = gc.isenabled(), gc.get_freeze_count()
    >>> RankCollector.after_first_pair().close()
    >>> (gc.isenabled(), gc.get_freeze_count()) == before
    True
    """

    def __init__(self, *, frozen: bool) -> None:
        self.frozen = frozen

    @classmethod
    def after_first_pair(cls, *, collected: bool = False) -> RankCollector:
        """Call once the first pair's ``register_pair`` has returned (its objects unreachable);
        ``collected``: the caller has just run a full collection (``run_pair`` does after a
        registration), so only the freeze is left (a second full pass over the imports' objects
        cost 0.3 s)."""
        if _caller_manages_collector():
            return cls(frozen=False)
        if not collected:
            gc.collect()
        _freeze()
        return cls(frozen=True)

    def close(self) -> None:
        """The rank is done: the frozen objects collectable again (a Python session goes on)."""
        if self.frozen:
            _unfreeze()
            self.frozen = False


_exit_registered = False


def freeze_at_exit() -> None:
    """At interpreter exit, freeze every object so that module teardown does not scan them (for a
    process that ends with the command: ``nir``). Exit handlers, thread joins and the flushing of
    files run as before; only the collector's last passes over the frozen objects are skipped."""
    global _exit_registered
    if not _exit_registered:
        atexit.register(gc.freeze)
        _exit_registered = True


def end_rank_process(code: int) -> int:
    """``code``, or, in a rank of a multi-process ``register-many`` (``WORLD_SIZE`` > 1), end the
    process here with ``code`` once its output is flushed, without the interpreter's teardown.

    Its gloo process group outlives ``destroy_process_group`` (torch keeps references to it in
    C++), and destroying its transport threads during the teardown sometimes aborts the process
    ("terminate called without an active exception", signal 6) after every file is written:
    seen on about one run in three of two ranks, under ``torchrun`` as under ``--workers``. By
    then each pair's outputs and the summary are on disk (written atomically, flushed), the W&B
    run is finished and the locks released; nothing else needs the teardown.
    """
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        world = 1
    if world <= 1:
        return code
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def package_python_path() -> str:
    """``PYTHONPATH`` for a child process of ours (``python -m nir_lightning...``) that imports this
    copy of ``nir_lightning`` first: a checkout run from its folder, or a benchmark's other checkout."""
    import nir_lightning

    here = os.path.dirname(os.path.dirname(os.path.abspath(nir_lightning.__file__)))
    return os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])
