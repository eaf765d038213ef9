"""File locks the store is written under (``fcntl.flock``), below :mod:`variants.store`.

Three kinds:

- the store lock (``STORE/.lock``): exclusive, held by one writer at a time
  (a ``generate`` run, a removal). Re-entrant within a thread, so a run that
  holds it can call other writers; other threads and processes wait for it.
  The holder writes its pid and what it does into the file, so a waiter can
  say whom it waits for.
- the profile lock (``STORE/.profile.lock``), the same kind of lock on its own
  file: profile runs of one store take turns, without waiting for writers.
- owner locks on staging folders: the process building a folder holds a lock on
  it until the folder is committed or discarded, so a sweep can tell an
  abandoned folder (no lock: its process died) from one still being written.

The kernel drops a process's flocks when it ends, however it ends (kill -9
too), so a lock can never outlive its holder and no lock file needs deleting.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from variants.errors import StoreError

log = logging.getLogger(__name__)

#: how long a writer waits for another one's store lock by default (seconds)
DEFAULT_TIMEOUT = 3600.0


class StoreLockedError(StoreError):
    """Another process (or thread) kept the store's lock for longer than the wait allowed."""


@dataclass
class _Held:
    """This process's hold on one lock file: the thread lock orders our own threads, the
    flock (taken by the first entry, dropped by the last exit) the other processes."""

    rlock: threading.RLock = field(default_factory=threading.RLock)
    fd: int | None = None
    depth: int = 0


_GUARD = threading.Lock()
_HELD: dict[str, _Held] = {}


def holder(path: Path) -> dict:
    """What the current holder of lock file ``path`` wrote about itself ({} if unknown)."""
    try:
        return json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


def describe(info: dict) -> str:
    """``pid 123 (generate resnet18, since ...)`` from what a holder wrote."""
    if not info.get("pid"):
        return "another process"
    host = f" on {info['host']}" if info.get("host") not in (None, socket.gethostname()) else ""
    parts = [p for p in (info.get("what"), info.get("since") and f"since {info['since']}") if p]
    return f"pid {info['pid']}{host}" + (f" ({', '.join(parts)})" if parts else "")


class StoreLock:
    """``with StoreLock(path, what, timeout):`` hold the exclusive lock in file ``path``.

    Waits up to ``timeout`` seconds (``None``: for ever; 0: not at all) and says once,
    as a warning, whom it waits for; raises :class:`StoreLockedError` naming the holder
    when the time is up.
    """

    def __init__(self, path: str | Path, what: str = "", timeout: float | None = None,
                 *, poll: float = 0.05):
        self.path = Path(path)
        self.what = what
        self.timeout = timeout
        self.poll = poll

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _held(self) -> _Held:
        key = os.path.realpath(self.path)
        with _GUARD:
            return _HELD.setdefault(key, _Held())

    def acquire(self) -> None:
        held = self._held()
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        if not held.rlock.acquire(timeout=-1 if deadline is None else max(self.timeout, 0)):
            raise StoreLockedError(f"{self.path.parent} is being written by another thread of "
                                   f"this process (pid {os.getpid()}) for more than "
                                   f"{self.timeout:g} s; wait for it to finish")
        try:
            if held.depth == 0:
                held.fd = self._flock(deadline)
            held.depth += 1
        except BaseException:
            held.rlock.release()
            raise

    def _flock(self, deadline: float | None) -> int:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StoreError(f"cannot open the store's lock file {self.path} ({e.strerror}); "
                             f"writing needs a store folder you can write to") from None
        warned = False
        poll = self.poll
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    pass
                except OSError as e:
                    raise StoreError(f"cannot lock {self.path} ({e.strerror}): its file system "
                                     f"does not support flock (NFS without locking?); put the "
                                     f"store on a local disk") from None
                who = describe(holder(self.path))
                if deadline is not None and time.monotonic() >= deadline:
                    raise StoreLockedError(
                        f"store {self.path.parent} is locked by {who}, still after "
                        f"{self.timeout:g} s; wait for that run to finish or stop it, or wait "
                        f"longer (--lock-timeout); the lock goes away by itself when its "
                        f"process ends")
                if not warned:
                    limit = "until it finishes" if deadline is None else \
                        f"up to {self.timeout:g} s"
                    log.warning("store %s is locked by %s; waiting %s", self.path.parent, who,
                                limit)
                    warned = True
                time.sleep(poll if deadline is None else
                           max(0.0, min(poll, deadline - time.monotonic())))
                poll = min(poll * 1.5, 0.5)
            info = {"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
                    "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            if warned:
                log.warning("store %s: lock acquired, going on", self.path.parent)
            return fd
        except BaseException:
            os.close(fd)
            raise

    def release(self) -> None:
        held = self._held()
        held.depth -= 1
        if held.depth == 0 and held.fd is not None:
            fd, held.fd = held.fd, None
            try:
                os.ftruncate(fd, 0)  # no stale holder to report once we are gone
            finally:
                os.close(fd)  # closing drops the flock
        held.rlock.release()


def lock_owner(path: Path) -> int:
    """Take the owner lock on folder ``path`` (just created by this process); returns the
    descriptor that holds it: :func:`release_owner` it after commit or discard."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def release_owner(fd: int) -> None:
    os.close(fd)


def is_owned(path: Path) -> bool:
    """Whether a live process (this one included) holds the owner lock on ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the probe's lock if it got one
    return False
