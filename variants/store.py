"""The on-disk variant store.

Layout::

    STORE/
      variants/<name>/manifest.json   name, key, parent, specs, files + sha256, ...
      variants/<name>/model.onnx      self-contained ONNX graph
      variants/<name>/weights.safetensors   torch weights (torch-stage variants)
      catalog.sqlite                  profiles (written by the profiler)
      .tmp/                           variants being written

A variant is written in ``.tmp/`` and moved into place with one atomic
rename, manifest last, so a crash leaves either the whole variant or nothing.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from variants._groupfile import Group, is_group, read_group, read_groups
from variants.errors import CorruptArtifactError, KeyConflictError, StoreError, UnknownNameError
from variants.specs import Spec, spec_from_dict

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


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

    def staging(self, name: str) -> Path:
        """A fresh temp folder to build variant ``name`` in before :meth:`commit`."""
        tmp = self.root / ".tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=tmp, prefix=f"{name}."))

    def commit(self, staging: Path, manifest: dict[str, Any]) -> Manifest:
        """Hash the staged files, write the manifest, and move the folder into place."""
        name = manifest["name"]
        if is_group(self.root, name):
            shutil.rmtree(staging, ignore_errors=True)
            raise KeyConflictError(f"{name!r} is a group in {self.root}; use --name or another "
                                   f"store")
        files = {}
        for f in sorted(staging.iterdir()):
            if f.name != MANIFEST and f.is_file():
                files[f.name] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        manifest = {**manifest, "files": files}
        manifest["bytes"] = files[manifest["onnx"]]["bytes"]
        atomic_write_text(staging / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
        target = self.variant_dir(name)
        if target.exists():
            existing = self.get(name) if name in self else None
            if existing is not None and existing.key != manifest["key"]:
                shutil.rmtree(staging, ignore_errors=True)
                raise KeyConflictError(f"variant {name!r} already exists in {self.root} with "
                                       f"another key ({existing.key}); use another --out store "
                                       f"or --name")
            # a leftover folder without a manifest is an interrupted write: replace it
            shutil.rmtree(target)
        os.replace(staging, target)
        return self.get(name)

    def groups(self) -> list[Group]:
        """The store's groups (served models over several bases, made with
        :func:`variants.group`), by name."""
        return read_groups(self.root)

    def group(self, name: str) -> Group:
        return read_group(self.root, name)

    def remove(self, name: str) -> None:
        d = self.variant_dir(name)
        if not d.exists():
            raise UnknownNameError("variant", name, self.names())
        trash = self.staging(f"deleted-{name}")
        os.replace(d, trash / name)
        shutil.rmtree(trash, ignore_errors=True)

    def clean_staging(self) -> int:
        """Remove folders left in ``.tmp/`` by interrupted runs; returns how many."""
        tmp = self.root / ".tmp"
        if not tmp.is_dir():
            return 0
        n = 0
        for d in tmp.iterdir():
            shutil.rmtree(d, ignore_errors=True)
            n += 1
        return n
