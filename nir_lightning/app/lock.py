"""One result, one writer: an exclusive lock file on an output folder (or an output file).

``nir register`` holds ``<output>/.nir.lock`` from before it looks for earlier results until it
has written ``metrics.json``; ``register-many`` holds each pair's, ``nir apply`` the one beside
its output file (``.<name>.nir.lock``). The lock file appears atomically with its content (a
hard link of a finished temporary file, or ``O_CREAT | O_EXCL`` where links are not supported)
and names its holder: host, PID, the process's start time (to tell a reused PID) and when.

A second process that finds the lock raises :class:`LockedError` (an :class:`InputError`, so
``nir`` exits 2 with its message). A lock whose holder is gone (same host, PID not alive, or
alive but started later: a reused PID) is taken over with a warning; a lock of another host is
never taken over unless asked (``force=True``, ``--force-unlock``), since its PID means nothing here.
Breaking a lock is serialised by a second file (``<lock>.break``), so two processes taking over
one stale lock cannot both win. While a lock is held, SIGTERM (``kill``, a batch system's time
limit) ends the process through ``SystemExit`` rather than at once, so the lock is released on
the way out and a job resubmitted to another host does not find it; only SIGKILL leaves one behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from nir_lightning.errors import InputError

if TYPE_CHECKING:
    from typing import Self

LOCK_NAME = ".nir.lock"
"""Name of the lock file inside a locked output folder."""
BREAK_TIMEOUT_S = 30.0
"""A ``.break`` file older than this was left by a process killed while breaking a lock."""
_log = logging.getLogger("nir_lightning")


@dataclass(frozen=True)
class LockInfo:
    """Who holds a lock (the JSON content of the lock file)."""

    host: str
    pid: int
    started: float  # time.time() when the lock was taken
    process_start: int | None = None  # /proc/<pid>/stat start time (clock ticks since boot), Linux only
    token: str = ""  # unique per acquisition: a release never removes someone else's lock
    command: str = ""

    def describe(self) -> str:
        """``PID 1234 on host X since 2024-05-01 12:03:05``.

        >>> LockInfo(host="node1", pid=1234, started=0.0).describe().startswith("PID 1234 on host node1 since ")
        True
        """
        if self.pid <= 0:
            return "an unknown process (the lock file is unreadable)"
        since = datetime.fromtimestamp(self.started).strftime("%Y-%m-%d %H:%M:%S")
        return f"PID {self.pid} on host {self.host} since {since}"


class LockedError(InputError):
    """The result is being written by another process (``holder``); nothing was touched."""

    def __init__(self, message: str, *, holder: LockInfo, lock_path: Path) -> None:
        super().__init__(message)
        self.holder = holder
        self.lock_path = lock_path


def folder_lock_path(folder: str | os.PathLike[str]) -> Path:
    """The lock of an output folder: ``<folder>/.nir.lock``."""
    return Path(folder) / LOCK_NAME


def file_lock_path(path: str | os.PathLike[str]) -> Path:
    """The lock of an output file, beside it: ``.<name>.nir.lock``.

    >>> file_lock_path("out/warped2.nii.gz").as_posix()
    'out/.warped2.nii.gz.nir.lock'
    """
    p = Path(path)
    return p.parent / f".{p.name}{LOCK_NAME}"


def _process_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux ``/proc``), else ``None``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:  # the command name (field 2) may hold spaces and parentheses: split after its last ')'
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def _alive(info: LockInfo) -> bool:
    """Whether the holder may still run (``True`` whenever this host cannot tell)."""
    if info.pid <= 0 or info.host != socket.gethostname():
        return True
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    except OSError:
        return True
    if info.process_start is not None:
        now = _process_start(info.pid)
        if now is not None and now != info.process_start:
            return False  # the PID was reused by a later process
    return True


def read_lock(path: str | os.PathLike[str]) -> LockInfo | None:
    """The holder named in a lock file; ``None`` when there is no lock file.

    An unreadable file (not JSON) gives a holder with ``pid`` 0, which is never taken over
    without ``force``.
    """
    p = Path(path)
    for attempt in range(5):
        try:
            text = p.read_text()
        except FileNotFoundError:
            return None
        except OSError:
            text = ""
        try:
            data = json.loads(text)
            return LockInfo(
                host=str(data["host"]), pid=int(data["pid"]), started=float(data["started"]),
                process_start=None if data.get("process_start") is None else int(data["process_start"]),
                token=str(data.get("token", "")), command=str(data.get("command", "")),
            )
        except (ValueError, KeyError, TypeError):
            if attempt < 4:
                time.sleep(0.02)  # an O_EXCL lock being filled in
    return LockInfo(host="?", pid=0, started=0.0, token=f"unreadable:{_mtime(p)}")


def _mtime(p: Path) -> int:
    try:
        return p.stat().st_mtime_ns
    except OSError:
        return 0


def _create(path: Path, info: LockInfo) -> bool:
    """Create ``path`` holding ``info`` if it does not exist; ``False`` if it does."""
    text = json.dumps(asdict(info), sort_keys=True) + "\n"
    tmp = path.with_name(f"{path.name}.{info.token}.tmp")
    tmp.write_text(text)
    try:
        try:
            os.link(tmp, path)  # atomic, and the lock is complete the moment it exists
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
                raise
        try:  # a file system without hard links
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        return True
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _break(path: Path, seen: LockInfo) -> None:
    """Remove the lock ``seen`` at ``path`` unless it changed meanwhile; one breaker at a time."""
    breaker = path.with_name(path.name + ".break")
    try:
        os.close(os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        with contextlib.suppress(OSError):
            if time.time() - breaker.stat().st_mtime > BREAK_TIMEOUT_S:
                breaker.unlink()  # its breaker was killed mid-way
        time.sleep(0.05)
        return
    try:
        again = read_lock(path)
        if again is not None and again.token == seen.token:
            path.unlink(missing_ok=True)
    finally:
        breaker.unlink(missing_ok=True)


@dataclass
class _Held:
    info: LockInfo
    count: int
    created: list[Path]  # folders this process created for the lock, deepest first
    thread: int = 0  # re-entrant for the thread that holds it only


_HELD: dict[Path, _Held] = {}  # locks this process holds (re-entrant: register-many, then register_pair)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the `finally` that releases the lock


def _hold(path: Path, held: _Held) -> None:
    # SIGTERM's default kills without clean-up; only that default is replaced, and only while locks are held
    if not _HELD and threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    _HELD[path] = held


def _unhold(path: Path) -> None:
    del _HELD[path]
    if not _HELD and threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is _exit_on_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def holder_alive(info: LockInfo) -> bool:
    """Whether the holder of a lock may still be running (``True`` when this host cannot tell:
    another host, an unreadable lock); ``False`` for a process of this host that is gone."""
    return _alive(info)


def _missing_parents(folder: Path) -> list[Path]:
    missing: list[Path] = []
    p = folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing


class OutputLock:
    """An acquired lock; :meth:`release` (or leaving the ``with`` block) removes it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._released = False

    def release(self) -> None:
        """Drop the lock (once); the folders created for it are removed again when still empty."""
        if self._released:
            return
        self._released = True
        held = _HELD.get(self.path)
        if held is None:
            return
        held.count -= 1
        if held.count > 0:
            return
        _unhold(self.path)
        now = read_lock(self.path)
        if now is not None and now.token == held.info.token:
            self.path.unlink(missing_ok=True)
        elif now is not None:
            _log.warning("the lock '%s' was taken over by %s while this process held it.", self.path, now.describe())
        for folder in held.created:  # a run stopped by bad input leaves no empty output folder
            try:
                folder.rmdir()
            except OSError:
                break

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire(
    lock_path: str | os.PathLike[str], *, what: str, force: bool = False, wait_s: float = 0.0, fix: str = "",
) -> OutputLock:
    """Take the lock file ``lock_path`` (creating its folder if needed) for this process.

    Args:
        lock_path: the lock file (:func:`folder_lock_path`, :func:`file_lock_path`).
        what: how the message names the locked result, e.g. ``"--output 'out'"``.
        force: take the lock over even from a live holder or another host (``--force-unlock``).
        wait_s: keep trying this long before giving up (0: give up at once).
        fix: extra advice appended to the message (e.g. ``" or pass --force-unlock"``).

    Raises:
        LockedError: another live process (or one on another host) holds the lock.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> with acquire(folder_lock_path(folder), what="demo"):
    ...     (folder / LOCK_NAME).is_file()
    True
    >>> (folder / LOCK_NAME).exists(), folder.rmdir()
    (False, None)
    """
    path = Path(os.path.abspath(lock_path))
    held = _HELD.get(path)
    if held is not None:
        if held.thread != threading.get_ident():
            raise LockedError(f"{what} is being written by another thread of this process ({held.info.describe()}); wait for it.",
                              holder=held.info, lock_path=path)
        held.count += 1
        return OutputLock(path)
    created = _missing_parents(path.parent)
    info = LockInfo(
        host=socket.gethostname(), pid=os.getpid(), started=time.time(), process_start=_process_start(os.getpid()),
        token=uuid.uuid4().hex, command=" ".join(sys.argv)[:300],
    )
    deadline = time.monotonic() + wait_s
    for _ in range(10_000):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if _create(path, info):
                _hold(path, _Held(info, 1, created, threading.get_ident()))
                return OutputLock(path)
        except FileNotFoundError:
            continue  # the folder was removed meanwhile (an empty folder released by another process)
        except OSError as exc:
            raise InputError(
                f"{what}: cannot create the lock file '{path}' ({exc.strerror or exc}); choose a folder you can write to."
            ) from exc
        other = read_lock(path)
        if other is None:
            continue  # released meanwhile
        if not _alive(other):
            _log.warning("%s: taking over the lock of %s, which is no longer running (lock file '%s').", what, other.describe(), path)
            _break(path, other)
            continue
        if force:
            _log.warning("%s: forced to take over the lock of %s (lock file '%s').", what, other.describe(), path)
            _break(path, other)
            continue
        if time.monotonic() < deadline:
            time.sleep(0.1)
            continue
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break
        gone = "if that process is gone" if other.host == socket.gethostname() or other.pid <= 0 else f"if that process on {other.host} is gone"
        raise LockedError(
            f"{what} is being written by {other.describe()}; wait for it, or, {gone}, remove the lock file '{path}'{fix}.",
            holder=other, lock_path=path,
        )
    raise RuntimeError(f"could not take the lock '{path}' (it kept changing)")


def lock_folder(folder: str | os.PathLike[str], *, what: str, force: bool = False, wait_s: float = 0.0, fix: str = "") -> OutputLock:
    """:func:`acquire` the lock of an output folder (the folder is created; removed at release if still empty)."""
    return acquire(folder_lock_path(folder), what=what, force=force, wait_s=wait_s, fix=fix)


def lock_file(path: str | os.PathLike[str], *, what: str, force: bool = False, wait_s: float = 0.0, fix: str = "") -> OutputLock:
    """:func:`acquire` the lock of an output file (a hidden file beside it)."""
    return acquire(file_lock_path(path), what=what, force=force, wait_s=wait_s, fix=fix)

