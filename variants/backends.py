"""Backends: turn a stored variant into a runnable session with one ``run(inputs)``.

Registered by name (``list_backends()``): ``onnxruntime`` (CPU EP; CUDA EP on
``cuda[:i]``; opens the variant's graph optimised once per device, :mod:`variants.ort_forms`)
and ``torch`` (rebuilds the structure and loads safetensors). :func:`host_form` is what a
host tier keeps for a re-load without the disk; :func:`supports_pool` says which backends
share identical tensors through a :class:`variants.shared.TensorPool`.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from variants.errors import BackendError
from variants.registry import Registry

log = logging.getLogger(__name__)

_BACKENDS: Registry[Callable[..., Session]] = Registry("backend")

#: onnxruntime's CPU memory arena grows in large steps and never shrinks, so with it an
#: int8 ResNet-18 peaks *above* its fp32 parent at batch 8 (141 vs 118 MiB). Without it a
#: variant's memory follows its tensors, which is what a memory-adaptive cache charges for.
CPU_MEM_ARENA = False


def env_flag(name: str, default: bool = False) -> bool:
    """An on/off setting from the environment: 1/0, true/false, yes/no, on/off (any case);
    unset or empty keeps ``default``; anything else warns, saying what it accepts, and keeps
    ``default`` (a typo must not silently flip a setting)."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    warnings.warn(f"{name}={os.environ[name]!r} is not an on/off value (1/0, true/false, "
                  f"yes/no, on/off); keeping the default ({'on' if default else 'off'})",
                  RuntimeWarning, stacklevel=2)
    return default


#: Whether CPU sessions over an already optimised graph run onnxruntime's buffer-reuse pass
#: when they open. The pass is most of a session's set-up once optimisation is off (ResNet-50
#: exit@3, 86 nodes on symbolic shapes: 1.5-2 ms of a 5 ms open), and it buys nothing here:
#: with the memory pattern on (the default) the run's buffers are laid out by their
#: lifetimes anyway. Measured in fresh processes (glibc's mmap threshold pinned): the peak of
#: a batch-1 and a batch-8 run and the steady run's time are the same with and without it.
#: A long-running multi-threaded server is another matter (``benchmarks/serve_ray.py``: its
#: replicas' resident memory grows further without the pass), so ``MEMADAPT_ORT_MEM_REUSE=1``
#: in the environment turns it back on, for every process that inherits it.
CPU_MEM_REUSE = env_flag("MEMADAPT_ORT_MEM_REUSE")


def register_backend(name: str, *, replace: bool = False):
    """Decorator: ``factory(manifest, device=, threads=, source=[, pool=]) -> Session``, the
    loader :func:`open_session` and the variant cache use for backend ``name``."""
    return _BACKENDS.register(name, replace=replace)


def list_backends() -> list[str]:
    return _BACKENDS.names()


def get_backend(name: str) -> Callable[..., Session]:
    """The session factory registered as backend ``name`` (unknown: the error lists them)."""
    return _BACKENDS.get(name)


def parse_device(device: str) -> tuple[str, int]:
    """``cpu`` -> ("cpu", 0); ``cuda`` / ``cuda:1`` -> ("cuda", i)."""
    if device == "cpu":
        return "cpu", 0
    if device == "cuda" or device.startswith("cuda:"):
        idx = device.partition(":")[2] or "0"
        if not idx.isdigit():
            raise BackendError(f"bad device {device!r}: use cpu, cuda or cuda:<index>")
        return "cuda", int(idx)
    raise BackendError(f"unknown device {device!r}: use cpu, cuda or cuda:<index>")


class Session:
    """A loaded variant. ``run`` takes a dict by input name, a sequence, or one array."""

    input_names: list[str]
    variant: str | None = None
    device: str = "cpu"

    def _feed(self, inputs: Any) -> list[Any]:
        if isinstance(inputs, Mapping):
            missing = [n for n in self.input_names if n not in inputs]
            if missing:
                raise BackendError(f"missing inputs {missing}; this model takes "
                                   f"{self.input_names}")
            return [inputs[n] for n in self.input_names]
        if isinstance(inputs, (list, tuple)):
            if len(inputs) != len(self.input_names):
                raise BackendError(f"got {len(inputs)} inputs, this model takes "
                                   f"{len(self.input_names)}: {self.input_names}")
            return list(inputs)
        if len(self.input_names) != 1:
            raise BackendError(f"this model takes {len(self.input_names)} inputs "
                               f"{self.input_names}; pass a dict or a tuple")
        return [inputs]

    def run(self, inputs: Any) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        pass


class OnnxSession(Session):
    """An onnxruntime InferenceSession with memadapt's uniform ``run``.

    ``optimized``: ``source`` is a graph onnxruntime already optimised for this device
    (:mod:`variants.ort_forms`), opened with graph optimisation off. ``initializers``: numpy
    arrays by tensor name that the session computes on in place (``add_initializer``; they
    are kept alive with the session), with ``folder`` the optimised graph's folder (ORT checks
    that the external tensors it is not asked to read exist there). ``release`` runs on
    :meth:`close` (gives pooled arrays back).
    """

    #: with a tensor pool: bytes fetched when loaded (the rest was pooled)
    read_bytes: int | None = None

    def __init__(self, source: str | Path | bytes, device: str = "cpu",
                 threads: int | None = None, variant: str | None = None, *,
                 optimized: bool = False, initializers: Mapping[str, Any] | None = None,
                 folder: str | Path | None = None, prepack: bool = True,
                 release: Callable[[], Any] | None = None):
        import onnxruntime as ort

        kind, idx = parse_device(device)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if kind == "cpu" and not CPU_MEM_ARENA:
            opts.enable_cpu_mem_arena = False
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        if optimized:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            if kind == "cpu" and not CPU_MEM_REUSE:
                opts.enable_mem_reuse = False
        if not prepack:
            opts.add_session_config_entry("session.disable_prepacking", "1")
        self._keep: tuple[Any, ...] = ()
        if initializers:
            if folder is not None:
                opts.add_session_config_entry(
                    "session.model_external_initializers_file_folder_path", str(folder))
            values = []
            for name, arr in initializers.items():
                v = ort.OrtValue.ortvalue_from_numpy(arr)
                opts.add_initializer(name, v)
                values.append(v)
            self._keep = (dict(initializers), values)
        if kind == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendError(f"device {device!r} asked for, but this onnxruntime has no "
                                   f"CUDA execution provider; install onnxruntime-gpu or use cpu")
            providers: list[Any] = [("CUDAExecutionProvider", {"device_id": idx}),
                                    "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        src = source if isinstance(source, bytes) else str(source)
        try:
            self._sess = ort.InferenceSession(src, sess_options=opts, providers=providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own opaque types
            where = "bytes" if isinstance(source, bytes) else str(source)
            if release is not None:
                release()
            raise BackendError(f"onnxruntime cannot load {where}: {e}") from None
        if kind == "cuda" and "CUDAExecutionProvider" not in self._sess.get_providers():
            raise BackendError(f"onnxruntime could not start the CUDA EP on {device!r} "
                               f"(no usable GPU or CUDA libraries); use --device cpu")
        self.input_names = [i.name for i in self._sess.get_inputs()]
        self._dtypes = [_np_dtype(i.type) for i in self._sess.get_inputs()]
        self.output_names = [o.name for o in self._sess.get_outputs()]
        self.device = device
        self.variant = variant
        self._release = release

    def run(self, inputs: Any) -> np.ndarray:
        feed = {}
        for name, dt, x in zip(self.input_names, self._dtypes, self._feed(inputs)):
            arr = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
            feed[name] = arr if arr.dtype == dt else arr.astype(dt)
        return self._sess.run(self.output_names[:1], feed)[0]

    @property
    def providers(self) -> list[str]:
        return self._sess.get_providers()

    def close(self) -> None:
        self._sess = None
        self._keep = ()
        release, self._release = self._release, None
        if release is not None:
            release()


def _np_dtype(ort_type: str):
    return {"tensor(float)": np.float32, "tensor(float16)": np.float16,
            "tensor(int64)": np.int64, "tensor(int32)": np.int32,
            "tensor(double)": np.float64, "tensor(bool)": np.bool_}.get(ort_type, np.float32)


def open_onnx(source: str | Path | bytes, device: str = "cpu", threads: int | None = None,
              variant: str | None = None) -> OnnxSession:
    """A session straight from an ONNX file or its bytes (graph optimised on every open)."""
    return OnnxSession(source, device=device, threads=threads, variant=variant)


#: Whether pooled onnxruntime sessions pre-pack their weights. Pre-packing gives each session
#: a private re-laid-out copy of every MatMul weight beside the shared original, so sharing
#: would save nothing on transformers; the pooled sessions compute on the shared arrays.
POOLED_PREPACK = False


@register_backend("onnxruntime")
def _onnxruntime(manifest, device: str = "cpu", threads: int | None = None,
                 source: Any = None, pool: Any = None) -> Session:
    """Open the variant's graph optimised for ``device`` (made once and kept in the store,
    :func:`variants.ort_forms.optimized_graph`) with graph optimisation off. ``source``: an
    :class:`~variants.ort_forms.OrtHostForm` (:func:`host_form`; the session computes on its
    arrays, no file is read) or, as before, ONNX bytes or a path (optimised on every open).
    ``pool``: a :class:`variants.shared.TensorPool` on the CPU; tensors another resident
    session holds are shared, the others join it; closing the session releases them."""
    from variants.ort_forms import OrtHostForm, check_pool_device, optimized_graph, take_arrays

    kind, _ = parse_device(device)
    if kind == "cuda" and manifest.quantized == "int8":
        raise BackendError(f"{manifest.name!r} is int8: onnxruntime's CUDA EP has no int8 "
                           f"kernels; serve fp32/fp16 variants on GPU or use --device cpu")
    if isinstance(source, (bytes, str, Path)) and pool is None:
        return OnnxSession(source, device=device, threads=threads, variant=manifest.name)
    if pool is not None:
        check_pool_device(pool, device)
    form = source if isinstance(source, OrtHostForm) else None
    graph = form.graph if form is not None else optimized_graph(manifest, device)
    if form is None and pool is None:  # from the stored optimised graph: ORT reads its tensors
        return OnnxSession(graph.graph_path, device=device, threads=threads,
                           variant=manifest.name, optimized=True)
    arrays, handle = take_arrays(graph, source=form, pool=pool, name=manifest.name)
    session = OnnxSession(form.graph_bytes if form is not None else graph.graph_bytes(),
                          device=device, threads=threads, variant=manifest.name, optimized=True,
                          initializers=arrays, folder=graph.folder,
                          prepack=pool is None or POOLED_PREPACK,
                          release=None if handle is None else lambda: pool.release(handle))
    session.read_bytes = None if handle is None else handle.read_bytes
    return session


class TorchSession(Session):
    """A torch module rebuilt from its architecture and safetensors weights."""

    #: with a tensor pool: bytes read from the file when loaded (the rest was pooled)
    read_bytes: int | None = None

    def __init__(self, module, input_names: Sequence[str], device: str = "cpu",
                 dtype=None, variant: str | None = None, release: Callable[[], Any] | None = None):
        import torch

        kind, idx = parse_device(device)
        self._torch = torch
        self._device = torch.device("cuda", idx) if kind == "cuda" else torch.device("cpu")
        self._dtype = dtype
        self.module = module.to(self._device, dtype=dtype) if dtype else module.to(self._device)
        self.input_names = list(input_names)
        self.device = device
        self.variant = variant
        self._release = release  # gives pooled tensors back (TensorPool.release)

    def run(self, inputs: Any) -> np.ndarray:
        torch = self._torch
        xs = []
        for x in self._feed(inputs):
            t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
            t = t.to(self._device, non_blocking=True)
            if self._dtype is not None and t.is_floating_point():
                t = t.to(self._dtype)
            xs.append(t)
        with torch.inference_mode():
            out = self.module(*xs)
        return out.float().cpu().numpy()

    def close(self) -> None:
        self.module = None
        release, self._release = self._release, None
        if release is not None:
            release()


@dataclass(eq=False)
class TorchHostForm:
    """What a host tier keeps of a torch variant: its state-dict tensors on the CPU (pinned
    when the sessions run on CUDA, so the copy back is a DMA). A re-load fills a skeleton
    built with empty parameters from them: on the CPU the module computes on these very
    tensors, on CUDA it copies them into fresh device tensors."""

    tensors: dict[str, Any]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def torch_host_form(manifest, device: str = "cpu") -> TorchHostForm:
    """Read a torch variant's safetensors into (on CUDA: pinned) host tensors."""
    if manifest.weights_path is None:
        raise BackendError(f"{manifest.name!r} has no torch weights; use --backend onnxruntime")
    from safetensors.torch import load_file

    kind, _ = parse_device(device)
    tensors = load_file(str(manifest.weights_path))
    if kind == "cuda":
        tensors = {k: v.pin_memory() for k, v in tensors.items()}
    return TorchHostForm(tensors)


_WARNED_THREADS: list[bool] = []


@register_backend("torch")
def _torch_backend(manifest, device: str = "cpu", threads: int | None = None,
                   source: Any = None, pool: Any = None) -> Session:
    """Rebuild the variant and load its safetensors; with ``pool`` (a
    :class:`variants.shared.TensorPool` on ``device``) through the pool, so tensors another
    resident variant already holds are shared, not read; closing the session releases them.
    ``source``: a :class:`TorchHostForm` (:func:`host_form`): the module is a skeleton
    filled from its tensors, no file is read."""
    if manifest.weights_path is None:
        raise BackendError(f"{manifest.name!r} has no torch weights ({manifest.quantized or 'onnx'}"
                           f"-only variant); use --backend onnxruntime")
    import torch

    from variants.families import get_family

    if threads and int(threads) != torch.get_num_threads() and not _WARNED_THREADS:
        # torch's intra-op threads are process-wide: a library must not change them
        _WARNED_THREADS.append(True)
        log.warning("torch backend: threads=%s is not applied per session (torch's intra-op "
                    "threads are process-wide, %d now); call torch.set_num_threads yourself",
                    threads, torch.get_num_threads())
    fam = get_family(manifest.family)
    names = [i["name"] for i in manifest.inputs]
    if pool is not None:
        from variants.tensors import tensor_index

        if pool.device != device:
            raise BackendError(f"the tensor pool holds tensors on {pool.device!r}, not on "
                               f"{device!r}; use one pool per device")
        module, handle = pool.load(fam, manifest.arch, manifest.weights_path, name=manifest.name,
                                   index=tensor_index(manifest.weights_path))
        session = TorchSession(module, names, device=device, variant=manifest.name,
                               release=lambda: pool.release(handle))
        session.read_bytes = handle.read_bytes
        return session
    if isinstance(source, TorchHostForm):
        return TorchSession(_from_host(fam, manifest, source, device), names, device=device,
                            variant=manifest.name)
    from safetensors.torch import load_file

    module = fam.rebuild(manifest.arch)
    module.load_state_dict(load_file(str(manifest.weights_path)))
    return TorchSession(module.eval(), names, device=device, variant=manifest.name)


def _from_host(fam, manifest, form: TorchHostForm, device: str):
    import torch

    from variants.tensors import empty_parameters, meta_names, set_tensor

    kind, idx = parse_device(device)
    target = torch.device("cuda", idx) if kind == "cuda" else None
    with empty_parameters():
        module = fam.rebuild(manifest.arch)
    for name, t in form.tensors.items():
        set_tensor(module, name, t if target is None else t.to(target, non_blocking=True))
    missing = meta_names(module)
    if missing:
        raise BackendError(f"host form of {manifest.name!r} lacks {missing[:3]}; it was made "
                           f"from another variant's weights")
    if target is not None:
        torch.cuda.synchronize(target)
    return module.eval()


#: backends whose sessions can load through a shared :class:`variants.shared.TensorPool`
#: (onnxruntime: on the CPU, the pool holding the optimised graphs' tensors as arrays)
POOLED_BACKENDS = frozenset({"torch", "onnxruntime"})


def supports_pool(backend: str) -> bool:
    """Whether ``backend``'s factory takes ``pool=`` (``VariantCache(share_weights=True)``)."""
    return backend in POOLED_BACKENDS


def host_form(manifest, backend: str, device: str = "cpu") -> Any:
    """What a host tier keeps of ``manifest`` so a re-load skips the disk; handed back to the
    backend's factory as ``source=``. onnxruntime: an :class:`~variants.ort_forms.OrtHostForm`
    (the graph optimised for ``device`` and its tensors as arrays the session computes on);
    torch: a :class:`TorchHostForm`. None: ``backend`` has no host form (re-loads read the
    files). Size it with :func:`host_nbytes`."""
    if backend == "onnxruntime":
        from variants.ort_forms import ort_host_form

        return ort_host_form(manifest, device)
    if backend == "torch" and manifest.weights_path is not None:
        return torch_host_form(manifest, device)
    return None


def host_nbytes(form: Any) -> int:
    """Host memory a :func:`host_form` result holds."""
    if isinstance(form, (bytes, bytearray, memoryview)):
        return len(form)
    return int(form.nbytes)


def open_session(store, name: str, *, device: str = "cpu", backend: str = "onnxruntime",
                 threads: int | None = None, verify: bool = True) -> Session:
    """Load stored variant ``name`` into a runnable session on ``device``."""
    from variants.store import Store

    store = store if isinstance(store, Store) else Store(store)
    factory = get_backend(backend)
    manifest = store.verify(name) if verify else store.get(name)
    return factory(manifest, device=device, threads=threads)


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else (os.cpu_count() or 1))
