"""onnxruntime load forms: a graph optimised once per device, its tensors in host memory.

Every ``InferenceSession`` built from a variant's ``model.onnx`` re-parses the protobuf and
re-runs onnxruntime's graph optimisation (ResNet-50 on 2 cores: about 130 ms on top of a
run). :func:`optimized_graph` runs it once per (variant, device, execution provider,
onnxruntime version, CPU instruction set) and keeps the result next to the variant::

    variants/<name>/ort/<form key>/model.onnx     optimised graph, tensors external
    variants/<name>/ort/<form key>/tensors.bin    its tensors (what ORT writes)
    variants/<name>/ort/<form key>/form.json      per tensor: offset, dtype, shape, content key

Sessions open it with graph optimisation off (on the CPU also without the buffer-reuse
pass, :data:`variants.backends.CPU_MEM_REUSE`, and from a graph whose intermediate shapes are
left for the session to infer): ResNet-50 exit@3 from a pool opens in under 4 ms instead of about 6.
A host tier keeps an :class:`OrtHostForm`:
the graph bytes (kilobytes) and every tensor as a numpy array, which a session takes with
``SessionOptions.add_initializer`` *without copying*: ORT computes on the arrays in place,
so a re-load costs a session's set-up and no byte copy, and several sessions (variants or
models holding identical tensors) can take the same array. That is how
:class:`variants.shared.TensorPool` shares onnxruntime tensors (keyed by
:func:`variants.tensors.TensorKey`, the content of the optimised tensor).

Measured before choosing (onnxruntime 1.31, in child processes): an ORT-format buffer opened
with ``session.use_ort_model_bytes_directly`` and ``use_ort_model_bytes_for_initializers``
crashes the process (SIGSEGV); ``add_external_initializers`` copies the tensors (five
sessions over one set of ResNet-18 arrays grew RSS by 248 MB, with ``add_initializer`` by
36 MB); a graph whose tensors are external and loaded from bytes is refused unless
``session.model_external_initializers_file_folder_path`` names the folder, and with every
external tensor given by ``add_initializer`` ORT opens no file of it.

Importing this module imports neither torch nor onnxruntime.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from variants.errors import BackendError
from variants.tensors import TensorKey

__all__ = ["FORM_VERSION", "OptimizedGraph", "OrtHostForm", "OrtTensor", "form_key",
           "optimized_graph", "ort_host_form", "ort_tensor_index"]

log = logging.getLogger(__name__)

#: bumped when the layout of the stored form changes (old forms are rebuilt, not read)
FORM_VERSION = 1
GRAPH = "model.onnx"
TENSORS = "tensors.bin"
FORM = "form.json"
#: tensors smaller than this stay inside the graph (ORT's own default threshold)
MIN_EXTERNAL_BYTES = 1024


@dataclass(frozen=True)
class OrtTensor:
    """One tensor of an optimised graph stored in its ``tensors.bin``."""

    name: str
    dtype: str  # numpy's name: "float32", "int8", ...
    shape: tuple[int, ...]
    offset: int
    length: int
    digest: str

    @property
    def key(self) -> TensorKey:
        return TensorKey(self.dtype, self.shape, self.digest, self.length)


@dataclass(frozen=True)
class OptimizedGraph:
    """A variant's graph optimised for one device: where it is and what tensors it holds."""

    folder: Path
    key: str
    tensors: tuple[OrtTensor, ...]
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def graph_path(self) -> Path:
        return self.folder / GRAPH

    @property
    def tensors_path(self) -> Path:
        return self.folder / TENSORS

    @property
    def nbytes(self) -> int:
        """Bytes of the external tensors (what a session over this graph holds)."""
        return sum(t.length for t in self.tensors)

    def graph_bytes(self) -> bytes:
        """The graph without its tensors (kept in memory after the first read)."""
        return _graph_bytes(str(self.graph_path), self.key)

    def index(self) -> dict[str, TensorKey]:
        """Content key of every external tensor, by name."""
        return dict(self._index)

    @functools.cached_property
    def _index(self) -> dict[str, TensorKey]:  # (asked for on every pooled open)
        return {t.name: t.key for t in self.tensors}

    def map(self, names: Iterable[str] | None = None) -> dict[str, Any]:
        """The tensors named (all by default) as copy-on-write maps of the file: no byte is
        read until a session touches it, pages stay shared with the page cache, and a tensor
        only a few rows of which are used (an embedding table) costs those rows. Tensors
        whose offset is not 64-byte aligned are read instead."""
        import numpy as np

        want = set(self.index()) if names is None else set(names)
        aligned = [t for t in self.tensors if t.name in want and t.offset % 64 == 0
                   and t.length > 0]
        out = self.read(want - {t.name for t in aligned})
        for t in aligned:
            out[t.name] = np.memmap(self.tensors_path, dtype=t.dtype, mode="c",
                                    offset=t.offset, shape=t.shape)
        return out

    def read(self, names: Iterable[str] | None = None) -> dict[str, Any]:
        """The tensors named (all by default) as fresh numpy arrays, read from the file."""
        import numpy as np

        want = set(self.index()) if names is None else set(names)
        out = {}
        with open(self.tensors_path, "rb") as f:
            for t in self.tensors:
                if t.name not in want:
                    continue
                a = np.empty(t.shape, dtype=t.dtype)
                f.seek(t.offset)
                if f.readinto(memoryview(a.reshape(-1).view(np.uint8))) != t.length:
                    raise BackendError(f"{self.tensors_path} is shorter than its form says; "
                                       f"delete {self.folder} (it is rebuilt on the next load)")
                out[t.name] = a
        return out


@functools.lru_cache(maxsize=512)
def _graph_bytes(path: str, key: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@dataclass(eq=False)
class OrtHostForm:
    """What a host tier keeps of an onnxruntime variant for a re-load without the disk: the
    optimised graph's bytes and its tensors as numpy arrays (all of them, or only those a
    tensor pool does not hold). Sessions opened from it compute on these arrays."""

    graph: OptimizedGraph
    graph_bytes: bytes
    arrays: dict[str, Any]

    @property
    def nbytes(self) -> int:
        return len(self.graph_bytes) + sum(a.nbytes for a in self.arrays.values())


# ---- keys ------------------------------------------------------------------------------------

def _cpu_isa() -> str:
    """A digest of the CPU's instruction-set flags: ORT's layout optimisation (NCHWc block
    size) depends on them, so a form made on an AVX-512 machine is not reused elsewhere."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((ln.split(":", 1)[1] for ln in f if ln.startswith("flags")), "")
    except OSError:
        pass
    words = " ".join(sorted(set(flags.split())))
    return hashlib.sha256(f"{platform.machine()}|{words}".encode()).hexdigest()[:12]


def _providers(device: str) -> list[Any]:
    if device.startswith("cuda"):
        idx = int(device.partition(":")[2] or 0)
        return [("CUDAExecutionProvider", {"device_id": idx}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def form_key(manifest, device: str = "cpu") -> str:
    """What the optimised graph depends on: the ONNX file's hash, the execution provider and
    device, onnxruntime's version, the CPU's instruction set and :data:`FORM_VERSION`."""
    import onnxruntime as ort

    onnx_sha = manifest.files[manifest.onnx].sha256
    ep = "cuda" if device.startswith("cuda") else "cpu"
    text = f"{FORM_VERSION}|{onnx_sha}|{ep}|{device}|{ort.__version__}|{_cpu_isa()}"
    return f"{ep}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


# ---- building and finding -------------------------------------------------------------------

def optimized_graph(manifest, device: str = "cpu") -> OptimizedGraph:
    """The variant's graph optimised for ``device``: read from its folder, or made now (once;
    written atomically, so concurrent loaders at worst both make it)."""
    if manifest.path is None:
        raise BackendError(f"{manifest.name!r} has no store folder to keep its optimised graph in")
    key = form_key(manifest, device)
    folder = Path(manifest.path) / "ort" / key
    got = _read_form(folder, key)
    if got is not None:
        return got
    _build(manifest, device, folder, key)
    got = _read_form(folder, key)
    if got is None:  # pragma: no cover - only if the folder vanished under us
        raise BackendError(f"optimised graph of {manifest.name!r} missing after building it")
    return got


def _read_form(folder: Path, key: str) -> OptimizedGraph | None:
    meta = folder / FORM
    if not meta.is_file() or not (folder / GRAPH).is_file():
        return None
    try:
        d = json.loads(meta.read_text(encoding="utf-8"))
        if d.get("form_version") != FORM_VERSION or d.get("key") != key:
            return None
        tensors = tuple(OrtTensor(t["name"], t["dtype"], tuple(t["shape"]), int(t["offset"]),
                                  int(t["length"]), t["digest"]) for t in d["tensors"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if tensors and not (folder / TENSORS).is_file():
        return None
    return OptimizedGraph(folder, key, tensors, info=d.get("info", {}))


def _build(manifest, device: str, folder: Path, key: str) -> None:
    import time

    import onnxruntime as ort

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{key}."))
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(tmp / GRAPH)
        opts.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", TENSORS)
        opts.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes",
            str(MIN_EXTERNAL_BYTES))
        t0 = time.perf_counter()
        try:
            ort.InferenceSession(str(manifest.onnx_path), sess_options=opts,
                                 providers=_providers(device))
        except Exception as e:  # noqa: BLE001 - ORT raises its own opaque types
            raise BackendError(f"onnxruntime cannot optimise {manifest.onnx_path}: {e}") from None
        seconds = time.perf_counter() - t0
        if not device.startswith("cuda"):  # (measured on the CPU EP only)
            _drop_value_info(tmp / GRAPH)
        tensors = _index_tensors(tmp)
        info = {"variant": manifest.name, "device": device, "seconds": round(seconds, 4),
                "onnxruntime": ort.__version__, "graph_bytes": (tmp / GRAPH).stat().st_size}
        (tmp / FORM).write_text(json.dumps({"form_version": FORM_VERSION, "key": key,
                                            "info": info, "tensors": tensors}, indent=1),
                                encoding="utf-8")
        if folder.exists() and _read_form(folder, key) is None:  # stale: set it aside
            trash = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".stale-{key}."))
            with contextlib.suppress(OSError):
                os.replace(folder, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process made it first (target not empty): keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("optimised graph of %s for %s in %.2f s (%d tensors)", manifest.name, device,
                 seconds, len(tensors))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _drop_value_info(path: Path) -> None:
    """Remove the intermediate shapes ORT wrote into the optimised graph: every session
    infers them again when it resolves the graph, and merging the written ones into its own
    costs more than inferring them (ResNet-50 exit@3: 0.3 ms of a 2.7 ms open). Tensors stay
    external; graph inputs' and outputs' types stay."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graphs = [model.graph]
    while graphs:
        g = graphs.pop()
        del g.value_info[:]
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
    onnx.save(model, str(path))


def _index_tensors(folder: Path) -> list[dict[str, Any]]:
    """Offset, dtype, shape and content digest of each external tensor ORT wrote."""
    import mmap

    import onnx
    from onnx import external_data_helper as edh
    from onnx.helper import tensor_dtype_to_np_dtype

    model = onnx.load(str(folder / GRAPH), load_external_data=False)
    out = []
    data = folder / TENSORS
    if not data.is_file():
        return out
    with open(data, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for init in _all_initializers(model.graph):
            if not edh.uses_external_data(init):
                continue
            ext = {e.key: e.value for e in init.external_data}
            if ext.get("location") != TENSORS:
                raise BackendError(f"optimised graph names external data {ext.get('location')!r}"
                                   f", expected {TENSORS}")
            off, n = int(ext.get("offset", 0)), int(ext["length"])
            dtype = str(tensor_dtype_to_np_dtype(init.data_type))
            shape = tuple(int(d) for d in init.dims)
            h = hashlib.sha256(f"{dtype}|{shape}|".encode())
            h.update(memoryview(mm)[off:off + n])
            out.append({"name": init.name, "dtype": dtype, "shape": list(shape), "offset": off,
                        "length": n, "digest": h.hexdigest()})
    return out


def _all_initializers(graph):
    yield from graph.initializer
    for node in graph.node:  # (subgraphs of If/Loop: their tensors are external too)
        for attr in node.attribute:
            if attr.g is not None and attr.HasField("g"):
                yield from _all_initializers(attr.g)
            for g in attr.graphs:
                yield from _all_initializers(g)


# ---- host forms -----------------------------------------------------------------------------

def ort_host_form(manifest, device: str = "cpu", *,
                  exclude: Iterable[TensorKey] = ()) -> OrtHostForm:
    """Read a variant's optimised graph into host memory; tensors whose content key is in
    ``exclude`` (those a tensor pool already holds) are left out."""
    g = optimized_graph(manifest, device)
    skip = set(exclude)
    names = [t.name for t in g.tensors if t.key not in skip]
    return OrtHostForm(g, g.graph_bytes(), g.read(names))


def ort_tensor_index(manifest, device: str = "cpu") -> dict[str, TensorKey]:
    """Content keys of the tensors an onnxruntime session of ``manifest`` on ``device``
    holds (its optimised graph's), for grouping what sessions share."""
    return optimized_graph(manifest, device).index()


def take_arrays(graph: OptimizedGraph, *, source: OrtHostForm | None = None,
                pool=None, name: str | None = None) -> tuple[dict[str, Any], Any]:
    """The arrays a session over ``graph`` needs, by tensor name, and the pool handle (None
    without ``pool``). Each comes from the pool if it holds the content, else from
    ``source``'s arrays, else from the file (joining the pool when there is one)."""
    have = source.arrays if source is not None else {}
    missing = [t.name for t in graph.tensors if t.name not in have]

    def fetch(names: list[str]) -> dict[str, Any]:
        need = [n for n in names if n not in have]
        got = graph.map(need) if need else {}
        return {n: (have[n] if n in have else got[n]) for n in names}

    if pool is None:
        return (dict(have) if not missing else fetch([t.name for t in graph.tensors])), None
    return pool.take_arrays(graph.index(), fetch, name=name)


def check_pool_device(pool, device: str) -> None:
    """Shared onnxruntime tensors are host arrays: a CUDA session would copy them."""
    if getattr(pool, "device", "cpu") != "cpu" or device != "cpu":
        raise BackendError(f"onnxruntime sessions share tensors on the CPU only (pool on "
                           f"{getattr(pool, 'device', '?')!r}, session on {device!r}); serve "
                           f"CUDA with share_weights=False or the torch backend")
