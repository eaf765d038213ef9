"""The on-disk variant store.

Layout::

    STORE/
      variants/<name>/manifest.json   name, key, parent, specs, files + sha256, ...
      variants/<name>/model.onnx      self-contained ONNX graph
      variants/<name>/weights.safetensors   torch weights (torch-stage variants)
      catalog.sqlite                  profiles (written by the profiler)
      .tmp/                           variants being written (and old ones being deleted)
      .lock                           the writers' lock (see :meth:`Store.lock`)

A variant is written in ``.tmp/`` and moved into place with one atomic
rename, manifest last, so a crash leaves either the whole variant or nothing;
a variant that replaces an older one is swapped in with one atomic exchange
(Linux ``renameat2``), so a reader or a crash sees the old one or the new one,
never neither. Writers (``generate``, :meth:`Store.remove`) hold the store's
lock, so concurrent runs into one store take turns instead of losing each
other's work; the process writing a staging folder holds a lock on it, so
:meth:`Store.clean_staging` sweeps only what dead processes left.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import errno
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from variants._groupfile import Group, is_group, read_group, read_groups
from variants._locks import (
    DEFAULT_TIMEOUT,
    StoreLock,
    StoreLockedError,
    is_owned,
    lock_owner,
    release_owner,
)
from variants.errors import CorruptArtifactError, KeyConflictError, StoreError, UnknownNameError
from variants.specs import Spec, spec_from_dict

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
LOCK = ".lock"
PROFILE_LOCK = ".profile.lock"
STAGING = ".tmp"
#: prefixes of the folders in .tmp/ that hold an old variant on its way out (a variant's
#: staging folder starts with its name, and no name starts with a dot)
_REPLACED, _REMOVED = ".replaced-", ".removed-"

__all__ = ["MANIFEST", "FileEntry", "Manifest", "Store", "StoreLockedError", "atomic_write_text",
           "now", "sha256_file", "toolkit_version", "versions"]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (a crash of the machine, not only the process)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap paths ``a`` and ``b`` in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``);
    False where the system or file system cannot, and the caller falls back to two renames."""
    if sys.platform != "linux":
        return False
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:  # glibc before 2.28
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


#: staging folders of this process -> the descriptor holding their owner lock
_STAGED: dict[str, int] = {}
_STAGED_GUARD = threading.Lock()


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """Everything known about one stored variant at generation time."""

    name: str
    key: str
    base: str
    parent: str | None
    specs: tuple[Spec, ...]
    family: str
    model: str
    task: str
    arch: dict[str, Any]
    inputs: tuple[dict, ...]
    outputs: tuple[str, ...]
    files: dict[str, FileEntry]
    params: int
    onnx: str
    weights: str | None
    export_check: dict[str, Any] | None
    metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    path: Path | None = field(default=None, compare=False)

    @property
    def bytes(self) -> int:
        """Size of the ONNX artifact (what a session loads)."""
        return self.files[self.onnx].bytes

    @property
    def onnx_path(self) -> Path:
        assert self.path is not None
        return self.path / self.onnx

    @property
    def weights_path(self) -> Path | None:
        return None if self.weights is None or self.path is None else self.path / self.weights

    @property
    def quantized(self) -> str | None:
        return next((s.mode for s in self.specs if s.kind == "quantize"), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "manifest_version": MANIFEST_VERSION, "name": self.name, "key": self.key,
            "base": self.base, "parent": self.parent,
            "specs": [s.to_dict() for s in self.specs], "family": self.family,
            "model": self.model, "task": self.task, "arch": self.arch,
            "inputs": list(self.inputs), "outputs": list(self.outputs),
            "files": {k: {"sha256": v.sha256, "bytes": v.bytes} for k, v in self.files.items()},
            "params": self.params, "bytes": self.bytes, "onnx": self.onnx,
            "weights": self.weights, "export_check": self.export_check,
            "metrics": self.metrics, "versions": self.versions, "created": self.created,
            "options": self.options,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: Path | None = None) -> Manifest:
        try:
            if d.get("manifest_version", 1) > MANIFEST_VERSION:
                raise StoreError(f"manifest {path} was written by a newer memadapt; upgrade")
            return cls(
                name=d["name"], key=d["key"], base=d["base"], parent=d.get("parent"),
                specs=tuple(spec_from_dict(s) for s in d["specs"]), family=d["family"],
                model=d["model"], task=d["task"], arch=d["arch"],
                inputs=tuple(d["inputs"]), outputs=tuple(d["outputs"]),
                files={k: FileEntry(v["sha256"], int(v["bytes"])) for k, v in d["files"].items()},
                params=int(d["params"]), onnx=d["onnx"], weights=d.get("weights"),
                export_check=d.get("export_check"), metrics=d.get("metrics", {}),
                versions=d.get("versions", {}), created=d.get("created", ""),
                options=d.get("options", {}), path=path,
            )
        except (KeyError, TypeError) as e:
            raise StoreError(f"manifest {path} is malformed (missing or bad field {e}); "
                             f"delete that variant folder and generate it again") from None


def versions() -> dict[str, str]:
    """Versions of the libraries that shaped an artifact (recorded in manifests)."""
    from importlib import metadata

    out = {}
    for dist in ("memadapt", "torch", "torchvision", "torch-pruning", "onnx", "onnxscript",
                 "onnxruntime-gpu", "onnxruntime", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def toolkit_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("memadapt")
    except metadata.PackageNotFoundError:  # running from a checkout without install
        return "0+unknown"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Store:
    """A folder of variants. Cheap to construct; reads manifests on demand."""

    def __init__(self, root: str | Path, *, create: bool = False):
        self.root = Path(root)
        if create:
            (self.root / "variants").mkdir(parents=True, exist_ok=True)
        elif not (self.root / "variants").is_dir():
            raise StoreError(f"{str(self.root)!r} is not a memadapt store (no variants/ folder); "
                             f"create one with `memadapt generate MODEL --out {self.root}`")

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.sqlite"

    def variant_dir(self, name: str) -> Path:
        if "/" in name or name.startswith(".") or not name:
            raise StoreError(f"bad variant name {name!r}")
        return self.root / "variants" / name

    def names(self, pattern: str = "*") -> list[str]:
        vdir = self.root / "variants"
        return sorted(d.name for d in vdir.iterdir()
                      if (d / MANIFEST).is_file() and fnmatch.fnmatch(d.name, pattern))

    def __contains__(self, name: str) -> bool:
        return (self.variant_dir(name) / MANIFEST).is_file()

    def __iter__(self) -> Iterator[Manifest]:
        return iter(self.manifests())

    def manifests(self, pattern: str = "*") -> list[Manifest]:
        return [self.get(n) for n in self.names(pattern)]

    def get(self, name: str) -> Manifest:
        path = self.variant_dir(name)
        mf = path / MANIFEST
        if not mf.is_file():
            raise UnknownNameError("variant", name, self.names())
        try:
            data = json.loads(mf.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise StoreError(f"{mf} is not valid JSON ({e}); delete the folder and regenerate") \
                from None
        return Manifest.from_dict(data, path)

    def by_key(self, key: str) -> Manifest | None:
        return next((m for m in self.manifests() if m.key == key), None)

    def verify(self, name: str) -> Manifest:
        """Check every file of a variant against its recorded sha256; name the bad file."""
        m = self.get(name)
        for rel, entry in m.files.items():
            f = m.path / rel
            if not f.is_file():
                raise CorruptArtifactError(f"variant {name!r}: file {f} is missing; "
                                           f"delete {m.path} and generate it again")
            if f.stat().st_size != entry.bytes or sha256_file(f) != entry.sha256:
                raise CorruptArtifactError(f"variant {name!r}: file {f} does not match the "
                                           f"sha256 in its manifest (corrupt or modified); "
                                           f"delete {m.path} and generate it again")
        return m

    @property
    def lock_path(self) -> Path:
        return self.root / LOCK

    def lock(self, what: str = "", timeout: float | None = DEFAULT_TIMEOUT) -> StoreLock:
        """``with store.lock("generate resnet18"):`` be the store's only writer.

        Held across processes (``fcntl.flock`` on ``STORE/.lock``) and re-entrant
        within a thread. Waits up to ``timeout`` seconds (``None``: for ever) for
        another writer, logging once whom it waits for, then raises
        :class:`StoreLockedError` naming that writer's pid. A holder that dies
        (even by kill -9) drops the lock at once.
        """
        return StoreLock(self.lock_path, what, timeout)

    def profile_lock(self, what: str = "",
                     timeout: float | None = DEFAULT_TIMEOUT) -> StoreLock:
        """``with store.profile_lock("profile cpu"):`` be the store's only profiler.

        Two profile runs at once would measure the same rows twice, each timing the other's
        load as its own, so they take turns on ``STORE/.profile.lock``, a lock of its own:
        a ``generate`` into the store does not wait for a profile run, nor one for it.
        Waits like :meth:`lock`.
        """
        return StoreLock(self.root / PROFILE_LOCK, what, timeout)

    def staging(self, name: str) -> Path:
        """A fresh temp folder to build variant ``name`` in before :meth:`commit` (or
        :meth:`discard`). This process holds its owner lock until then, so
        :meth:`clean_staging` in any process leaves it alone."""
        self.variant_dir(name)  # validates the name
        path = Path(tempfile.mkdtemp(dir=self._tmp(), prefix=f"{name}."))
        self._own(path)
        return path

    def _tmp(self) -> Path:
        tmp = self.root / STAGING
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp

    @staticmethod
    def _own(path: Path) -> None:
        fd = lock_owner(path)
        with _STAGED_GUARD:
            _STAGED[str(path)] = fd

    @staticmethod
    def _disown(path: Path) -> None:
        with _STAGED_GUARD:
            fd = _STAGED.pop(str(path), None)
        if fd is not None:
            release_owner(fd)

    def discard(self, staging: Path) -> None:
        """Delete a staging folder that will not be committed (a failed or interrupted build)."""
        shutil.rmtree(staging, ignore_errors=True)
        self._disown(staging)

    def commit(self, staging: Path, manifest: dict[str, Any]) -> Manifest:
        """Hash the staged files, write the manifest, and move the folder into place.

        A folder already at the variant's place (the same key made again, or a
        folder an old crash left without a manifest) is swapped out in one atomic
        exchange; where the file system cannot exchange, it is first renamed into
        ``.tmp/`` and :meth:`clean_staging` puts it back should the process die
        before the new one is in place.
        """
        name = manifest["name"]
        try:
            with self.lock(f"commit {name}"):
                return self._commit(staging, manifest)
        finally:
            self._disown(staging)

    def _commit(self, staging: Path, manifest: dict[str, Any]) -> Manifest:
        name = manifest["name"]
        if is_group(self.root, name):
            shutil.rmtree(staging, ignore_errors=True)
            raise KeyConflictError(f"{name!r} is a group in {self.root}; use --name or another "
                                   f"store")
        files = {}
        for f in sorted(staging.iterdir()):
            if f.name != MANIFEST and f.is_file():
                _fsync_file(f)
                files[f.name] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        manifest = {**manifest, "files": files}
        manifest["bytes"] = files[manifest["onnx"]]["bytes"]
        atomic_write_text(staging / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
        _fsync_dir(staging)
        target = self.variant_dir(name)
        if not os.path.lexists(target):
            os.replace(staging, target)
        else:
            existing = self.get(name) if name in self else None
            if existing is not None and existing.key != manifest["key"]:
                shutil.rmtree(staging, ignore_errors=True)
                raise KeyConflictError(f"variant {name!r} already exists in {self.root} with "
                                       f"another key ({existing.key}); use another --out store "
                                       f"or --name")
            self._swap_in(staging, target)
        _fsync_dir(target.parent)
        return self.get(name)

    def _swap_in(self, staging: Path, target: Path) -> None:
        """Put ``staging`` at ``target`` in place of what is there, and delete the old one."""
        if _exchange(staging, target):
            shutil.rmtree(staging, ignore_errors=True)  # the old folder now lies there
            return
        trash = Path(tempfile.mkdtemp(dir=self._tmp(), prefix=_REPLACED))
        os.replace(target, trash / target.name)
        # a crash here leaves no variant at target: clean_staging restores it from trash
        os.replace(staging, target)
        shutil.rmtree(trash, ignore_errors=True)

    def groups(self) -> list[Group]:
        """The store's groups (served models over several bases, made with
        :func:`variants.group`), by name."""
        return read_groups(self.root)

    def group(self, name: str) -> Group:
        return read_group(self.root, name)

    def remove(self, name: str) -> None:
        """Delete a variant: one rename takes it out of the store, then its files go."""
        d = self.variant_dir(name)
        with self.lock(f"remove {name}"):
            if not os.path.lexists(d):
                raise UnknownNameError("variant", name, self.names())
            trash = Path(tempfile.mkdtemp(dir=self._tmp(), prefix=_REMOVED))
            os.replace(d, trash / name)
            _fsync_dir(d.parent)
            shutil.rmtree(trash, ignore_errors=True)

    def clean_staging(self) -> int:
        """Sweep ``.tmp/`` of what interrupted runs left; returns how many folders went.

        Only folders no live process holds (their writer died, or gave up without
        discarding them) are touched, so a concurrent ``generate``'s work is safe. An
        old variant caught between the two renames of a replacement whose process died
        is put back in place rather than deleted.
        """
        tmp = self.root / STAGING
        if not tmp.is_dir():
            return 0
        n = 0
        with self.lock("clean staging"):
            for d in sorted(tmp.iterdir()):
                if d.is_dir() and not d.is_symlink():
                    if is_owned(d):
                        continue
                    if d.name.startswith(_REPLACED):
                        self._restore(d)
                    shutil.rmtree(d, ignore_errors=True)
                else:
                    with _suppress():
                        d.unlink()
                n += 1
        return n

    def _restore(self, trash: Path) -> None:
        """Put an old variant back whose replacement died between its two renames."""
        for old in trash.iterdir():
            target = self.variant_dir(old.name)
            if (old / MANIFEST).is_file() and not (target / MANIFEST).is_file():
                if os.path.lexists(target):  # a folder without a manifest is no variant
                    shutil.rmtree(target, ignore_errors=True)
                os.replace(old, target)
                _fsync_dir(target.parent)
                log.warning("restored variant %s in %s (its replacement was interrupted)",
                            old.name, self.root)
