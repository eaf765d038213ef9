"""Calibration and evaluation data, by name or from the user's files.

Built-in sources need no download:

- ``random``: random inputs of the serving shape (memory/latency work only);
- ``digits``: scikit-learn's bundled handwritten digits (1797 labelled 8x8
  images, 10 classes), split deterministically into train/calib/eval;
- ``text``: sentences from Python's own documentation strings (unlabelled).

User data: ``.npz`` (arrays ``x``/``inputs`` and optional ``y``/``labels``),
``.npy`` (inputs only), ``.txt`` (one text per line), or a folder of images
in one sub-folder per class.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from variants.errors import DataError
from variants.registry import Registry

#: built-in data sources by name: ``fn(split) -> Dataset`` for split train/calib/eval
_SOURCES: Registry[Callable[[str], Dataset]] = Registry("data source", error=DataError)
#: "heldout" is what training is judged on: the built-in eval split, or the 20% of a user's
#: labelled file that "train" leaves out (a user's file given for evaluation is used whole)
SPLITS = ("train", "calib", "eval", "heldout")


@dataclass(frozen=True)
class Dataset:
    """Raw inputs (images array or list of texts), optional integer labels."""

    name: str
    inputs: Any
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.inputs)

    def take(self, n: int | None) -> Dataset:
        if n is None or n >= len(self):
            return self
        lab = None if self.labels is None else self.labels[:n]
        return Dataset(self.name, self.inputs[:n], lab)

    def batches(self, batch: int):
        for i in range(0, len(self), batch):
            lab = None if self.labels is None else self.labels[i:i + batch]
            yield self.inputs[i:i + batch], lab


def register_source(name: str, *, replace: bool = False):
    """Decorator: ``fn(split) -> Dataset`` (split train, calib or eval) as data source
    ``name``, usable wherever a source is accepted (``--calib``, ``--eval``)."""
    return _SOURCES.register(name, replace=replace)


def list_sources() -> list[str]:
    return _SOURCES.names()


@register_source("random")
def _random(split: str) -> Dataset:
    raise DataError("'random' has no stored samples; use calibration()")


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)  # (1797, 8, 8) in [0, 1]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(1234).permutation(len(y))
    return x[order], y[order]


@register_source("digits")
def _digits_split(split: str) -> Dataset:
    x, y = _digits()
    # 1197 train, 200 calib, 400 eval: calibration never sees the eval images
    bounds = {"train": (0, 1197), "calib": (1197, 1397), "eval": (1397, 1797)}[split]
    a, b = bounds
    return Dataset(f"digits:{split}", x[a:b], y[a:b])


@functools.lru_cache(maxsize=1)
def labelled_corpus() -> tuple[tuple[str, str], ...]:
    """(sentence, module) pairs from the docstrings of Python's standard library
    (deterministic): the built-in text source, and a real label set (which module a
    sentence documents) for task heads trained without downloads.

    Each module of :data:`CORPUS_MODULES`, in order, gives its own docstring, those of
    its public attributes and those of the public members of the classes it defines. A
    sentence is kept once (the first module labels it) when it is 30 to 300 characters
    long and starts with a letter.
    """
    import importlib
    import re
    import warnings

    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    with warnings.catch_warnings():  # reading deprecated aliases (typing.io) stays quiet
        warnings.simplefilter("ignore")
        for name in CORPUS_MODULES:
            for doc in _module_docs(importlib.import_module(name)):
                for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                    if 30 <= len(s) <= 300 and s[0].isalpha() and s not in seen:
                        seen.add(s)
                        out.append((s, name))
    return tuple(out)


def _module_docs(mod) -> list[str]:
    """Docstrings of ``mod``, of its public attributes, and of the public members of the
    classes ``mod`` defines itself. Only an object's *own* docstring counts: sub-modules
    (attributes only once something imported them) and plain values (an ``int`` constant,
    ``sys.stdout``, which carry their type's docstring) are skipped, so the corpus does not
    depend on what the process imported or replaced before."""
    docs = [mod.__doc__ or ""]
    for attr in sorted(dir(mod)):
        if attr.startswith("_"):
            continue
        obj = getattr(mod, attr, None)
        docs.append(_own_doc(obj))
        if isinstance(obj, type) and obj.__module__ == mod.__name__:
            members = vars(obj)
            docs += [_own_doc(members[m]) for m in sorted(members) if not m.startswith("_")]
    return [d for d in docs if d]


def _own_doc(obj) -> str:
    """``obj``'s own docstring, or "" (see :func:`_module_docs`); objects that a third-party
    package put there (transformers patches ``logging.Logger``) are skipped too."""
    import sys
    import types

    doc = getattr(obj, "__doc__", None)
    if not isinstance(doc, str) or isinstance(obj, types.ModuleType):
        return ""
    owner = getattr(obj, "__module__", None)
    if isinstance(owner, str) and owner.split(".")[0] not in sys.stdlib_module_names:
        return ""
    return doc if isinstance(obj, type) or doc is not getattr(type(obj), "__doc__", None) else ""


#: The standard-library modules whose docstrings make the built-in text corpus: modules
#: of every CPython from 3.10 on, none deprecated for removal, none with import side
#: effects, no network or download. About 8,500 sentences on Python 3.11 (the first 30
#: modules, without class members, gave 1,822: distillation then saw each training
#: sentence ten times and overfitted). Order decides only which module labels a sentence
#: that two modules share.
CORPUS_MODULES = (
    "json", "os", "pathlib", "collections", "functools", "itertools", "random", "re",
    "string", "textwrap", "datetime", "decimal", "fractions", "statistics", "heapq",
    "bisect", "csv", "argparse", "logging", "threading", "queue", "shutil", "tempfile",
    "zipfile", "unittest", "difflib", "calendar", "inspect", "contextlib", "dataclasses",
    "abc", "ast", "asyncio", "base64", "builtins", "bz2", "cmath", "cmd", "code", "codecs",
    "colorsys", "concurrent.futures", "configparser", "contextvars", "copy", "dis", "doctest",
    "email.message", "email.utils", "enum", "filecmp", "fnmatch", "ftplib", "getopt",
    "gettext", "glob", "graphlib", "gzip", "hashlib", "hmac", "html", "html.parser",
    "http.client", "http.cookiejar", "http.server", "imaplib", "importlib", "io", "ipaddress",
    "linecache", "locale", "lzma", "mailbox", "math", "mimetypes", "multiprocessing",
    "numbers", "operator", "optparse", "pdb", "pickle", "pickletools", "pkgutil", "platform",
    "plistlib", "poplib", "pprint", "profile", "pstats", "pydoc", "quopri", "reprlib",
    "sched", "secrets", "selectors", "shelve", "shlex", "signal", "smtplib", "socket",
    "socketserver", "sqlite3", "stat", "struct", "subprocess", "sys", "sysconfig", "tarfile",
    "timeit", "tokenize", "trace", "traceback", "tracemalloc", "types", "typing",
    "unittest.mock", "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref",
    "xml.dom.minidom", "xml.etree.ElementTree", "xml.sax", "xmlrpc.client", "zipimport",
    "zlib", "time", "array", "bdb", "codeop", "compileall", "runpy", "tabnanny", "netrc",
    "ctypes", "logging.handlers", "json.decoder", "email.parser", "email.policy", "gc",
    "zoneinfo", "webbrowser", "wsgiref.util", "unicodedata", "modulefinder", "py_compile",
    "symtable", "keyword", "token")


def _corpus() -> tuple[str, ...]:
    """Sentences of :func:`labelled_corpus`."""
    return tuple(s for s, _ in labelled_corpus())


@register_source("text")
def _text_split(split: str) -> Dataset:
    """About 50% train, 25% calib, 25% eval of the corpus, disjoint. A sentence's split and
    its place in it come from a hash of the sentence itself, so a sentence that one Python
    (or one process, whose imports patched a docstring) lacks moves no other sentence
    between splits."""
    import hashlib

    keyed = sorted((int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "big"), t)
                   for t in _corpus())
    want = {"train": (0, 1), "calib": (2,), "eval": (3,)}[split]
    return Dataset(f"text:{split}", [t for h, t in keyed if h % 4 in want])


def _from_path(p: Path, split: str) -> Dataset:
    if p.is_dir():
        return _image_folder(p)
    if not p.is_file():
        raise DataError(f"data source {str(p)!r} is neither a built-in name "
                        f"({', '.join(list_sources())}) nor an existing file or folder")
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            keys = set(z.files)
            xk = next((k for k in ("x", "inputs", "X") if k in keys), None)
            if xk is None:
                raise DataError(f"{str(p)!r} has arrays {sorted(keys)}; expected inputs under "
                                f"'x' or 'inputs' (and labels under 'y' or 'labels')")
            yk = next((k for k in ("y", "labels") if k in keys), None)
            x = z[xk].astype(np.float32) if z[xk].dtype.kind == "f" else z[xk]
            y = z[yk].astype(np.int64) if yk else None
        if y is not None and len(y) != len(x):
            raise DataError(f"{str(p)!r}: {len(x)} inputs but {len(y)} labels")
        return Dataset(str(p), x, y)
    if p.suffix == ".npy":
        return Dataset(str(p), np.load(p, allow_pickle=False))
    if p.suffix in (".txt", ".text"):
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not lines:
            raise DataError(f"{str(p)!r} holds no text lines")
        return Dataset(str(p), lines)
    raise DataError(f"cannot read data from {str(p)!r}: use .npz, .npy, .txt or an image folder")


def _image_folder(root: Path) -> Dataset:
    from PIL import Image

    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"image folder {str(root)!r} needs one sub-folder per class")
    xs, ys = [], []
    for label, c in enumerate(classes):
        for f in sorted((root / c).iterdir()):
            if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"):
                img = Image.open(f).convert("RGB")
                xs.append(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0)
                ys.append(label)
    if not xs:
        raise DataError(f"image folder {str(root)!r} holds no .png/.jpg images")
    shapes = {x.shape for x in xs}
    if len(shapes) > 1:
        raise DataError(f"images in {str(root)!r} differ in size {sorted(shapes)}; resize them")
    return Dataset(str(root), np.stack(xs), np.asarray(ys, dtype=np.int64))


def load_data(source: str, split: str = "calib") -> Dataset:
    """A built-in source by name or a user path; ``split`` picks train/calib/eval."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    if source in _SOURCES:
        return _SOURCES.get(source)("eval" if split == "heldout" else split)
    ds = _from_path(Path(source), split)
    if ds.labels is None or split in ("calib", "eval"):
        return ds
    # training on labelled user data: a deterministic 80/20 split keeps "heldout" unseen
    order = np.random.default_rng(4321).permutation(len(ds))
    cut = int(0.8 * len(ds))
    idx = np.sort(order[:cut] if split == "train" else order[cut:])
    inputs = ds.inputs[idx] if isinstance(ds.inputs, np.ndarray) else [ds.inputs[i] for i in idx]
    return Dataset(f"{ds.name}:{split}", inputs, ds.labels[idx])


def default_source(family_name: str) -> str:
    return {"resnet": "digits", "bert": "text"}.get(family_name, "random")


@dataclass
class Calibration:
    """Batches of model inputs (tuples of tensors) for quantization and distillation."""

    source: str
    batches: list[tuple[Any, ...]]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def calibration(family, arch: dict, source: str | None = None, *, samples: int = 64,
                batch: int = 16, seed: int = 0) -> Calibration:
    """Model-ready calibration batches from ``source`` (default per family)."""
    source = source or default_source(family.name)
    if source == "random":
        n = max(1, samples // batch)
        return Calibration(source, [family.example_inputs(arch, batch, seed=seed + i)
                                    for i in range(n)])
    ds = load_data(source, "calib").take(samples)
    return Calibration(source, [family.data_inputs(arch, x) for x, _ in ds.batches(batch)])
