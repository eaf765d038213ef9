"""What the server says about its models: metadata (versions = variants), readiness, and the
model repository extension's load and unload, on top of one :class:`VariantCache`.

**Versions.** A model has one version in Triton's sense, ``"1"`` (:data:`MODEL_VERSION`): the
model as memadapt serves it, at whichever variant fits the budget. Its variants are versions
too (metadata lists them as ``versions``), so every versioned route
(``/v2/models/M/versions/V``, ``.../ready``, ``.../infer``) takes ``"1"`` or a variant name;
any other version is 404. A version never forces a variant: an inference at any version runs
on the variant memadapt chose, and the answer's ``model_version`` names it. Readiness at a
variant says whether that variant is resident now; at ``"1"`` it is the model's readiness.

Every model the cache serves starts *available*: it is loaded on its first request, as the
cache always does. ``unload`` takes a model out of service (its requests are refused until
``load``); ``load`` puts it back and makes it resident now. The cache has no way to load a
model other than a request, so ``load`` sends one (a batch of one in the exported shape):
the variant is the one the policy loads for a miss (memadapt: the fastest eligible to load,
a better one following beside it when memory allows), the warm-up counts as a request in
the cache's counters (hits, misses, cold loads, the policy's request rates) though not in
the server's latency and SLO metrics, and the model is not pinned: the policy may shed it
later like any other.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from adaptive.errors import AdaptiveError
from adaptive.serve.oip import OIPError, TensorSpec, datatype_of

__all__ = ["MODEL_VERSION", "ModelInfo", "Repository", "describe"]

log = logging.getLogger(__name__)

#: The one version of every model (Triton's default); its variants are versions too.
MODEL_VERSION = "1"


@dataclass(frozen=True)
class ModelInfo:
    """One served model as the protocol's metadata shows it."""

    name: str
    versions: tuple[str, ...]  # its candidate variants, in the cache's order
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "versions": list(self.versions), "platform": self.platform,
                "inputs": [t.to_json() for t in self.inputs],
                "outputs": [t.to_json() for t in self.outputs]}

    def check_version(self, version: str) -> str:
        """``version`` if the model has it (:data:`MODEL_VERSION` or a variant), else
        OIPError 404 listing the versions it has."""
        if version == MODEL_VERSION or version in self.versions:
            return version
        raise OIPError(404, f"model {self.name!r} has no version {version!r}; its versions: "
                            f"{MODEL_VERSION!r} (the model, at the variant memadapt chooses) "
                            f"or a variant: {', '.join(self.versions)}")


def _onnx_output(manifest: Any, backend: str) -> tuple[str, tuple[int, ...]]:
    """The datatype and shape (-1: dynamic) of the output a session returns (its first)."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    graph = onnx.load(str(manifest.onnx_path), load_external_data=False).graph
    out = graph.output[0].type.tensor_type
    shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in out.shape.dim)
    # the torch backend returns float32 whatever the variant's precision
    dtype = np.float32 if backend == "torch" else tensor_dtype_to_np_dtype(out.elem_type)
    return datatype_of(dtype), shape


def describe(cache: Any) -> dict[str, ModelInfo]:
    """Metadata of every model ``cache`` serves, from its variants' manifests and graphs.

    Inputs come from the manifests (str axes are dynamic, -1); the output's shape merges the
    candidates' graphs (an axis on which variants differ is -1).
    """
    infos = {}
    for model in cache.models:
        versions = tuple(c.variant for c in cache.candidates(model))
        manifests = [cache.store.get(v) for v in versions]
        first = manifests[0]
        inputs = tuple(TensorSpec.from_manifest(d) for d in first.inputs)
        outs = [_onnx_output(m, cache.backend) for m in manifests]
        dtype = outs[0][0]
        shape = list(outs[0][1])
        for dt, sh in outs[1:]:
            if len(sh) != len(shape):
                shape = []
                break
            shape = [a if a == b else -1 for a, b in zip(shape, sh)]
            if dt != dtype:
                log.warning("model %r: variants return different datatypes (%s, %s)", model,
                            dtype, dt)
        name = first.outputs[0] if first.outputs else "output"
        infos[model] = ModelInfo(model, versions, f"memadapt_{cache.backend}", inputs,
                                 (TensorSpec(name, dtype, tuple(shape)),))
    return infos


def _warmup_inputs(manifest: Any) -> dict[str, np.ndarray]:
    """A batch of one in the shape the model was exported at (to bring it resident)."""
    from variants.families import get_family

    xs = get_family(manifest.family).example_inputs(manifest.arch, 1)
    return {d["name"]: x.numpy() for d, x in zip(manifest.inputs, xs)}


class Repository:
    """Availability of the cache's models, and load/unload (the repository extension)."""

    def __init__(self, cache: Any, models: Mapping[str, ModelInfo]):
        self.cache = cache
        self.models = dict(models)
        self._lock = threading.Lock()
        self._unloaded: set[str] = set()

    def info(self, model: str) -> ModelInfo:
        try:
            return self.models[model]
        except KeyError:
            raise OIPError(404, f"unknown model {model!r}; served: "
                                f"{', '.join(sorted(self.models))}") from None

    def available(self, model: str) -> bool:
        with self._lock:
            return model not in self._unloaded

    def unavailable_reason(self, model: str) -> str | None:
        """None when ``model`` can be served now, else why not (unloaded, budget too small)."""
        self.info(model)
        if not self.available(model):
            return (f"model {model!r} is unloaded; POST /v2/repository/models/{model}/load "
                    f"to serve it again")
        floor = self.cache.stats().models[model].floor
        fits = [c.memory_bytes for c in self.cache.candidates(model) if c.accuracy >= floor]
        budget = self.cache.budget
        if not fits:
            return f"model {model!r} has no variant with accuracy >= its floor {floor:g}"
        if min(fits) > budget:
            return (f"model {model!r}: its smallest variant meeting the floor {floor:g} needs "
                    f"{min(fits)} bytes, more than the budget of {budget} bytes")
        return None

    def check_servable(self, model: str) -> None:
        """Raise OIPError 404 (unknown) or 503 (unloaded) unless requests may go to ``model``."""
        self.info(model)
        if not self.available(model):
            raise OIPError(503, self.unavailable_reason(model) or "unavailable")

    def index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        resident = self.cache.resident()
        rows = []
        for m in sorted(self.models):
            why = self.unavailable_reason(m)
            if ready_only and why is not None:
                continue
            row = {"name": m, "version": resident.get(m, ""),
                   "state": "READY" if why is None else "UNAVAILABLE"}
            if why is not None:
                row["reason"] = why
            rows.append(row)
        return rows

    def load(self, model: str) -> str:
        """Make ``model`` available and resident now (a warm-up request at batch 1 when no
        variant is resident); returns the resident variant. Raises InfeasibleBudget when none
        meeting the floor fits. Not pinned: the cache may shed it later like any other model
        (see the module docstring)."""
        info = self.info(model)
        with self._lock:
            was_unloaded = model in self._unloaded
            self._unloaded.discard(model)
        resident = self.cache.resident().get(model)
        if resident is not None:
            return resident
        manifest = self.cache.store.get(info.versions[0])
        try:
            return self.cache.infer(model, _warmup_inputs(manifest)).variant
        except Exception as e:
            if was_unloaded:  # a load that failed leaves an unloaded model unloaded
                with self._lock:
                    self._unloaded.add(model)
            if isinstance(e, AdaptiveError):
                raise
            # the session's own error, reported as such
            raise OIPError(500, f"model {model!r} failed to load: {e}") from None

    def unload(self, model: str) -> None:
        """Refuse ``model``'s requests until :meth:`load` and free its memory (requests
        already running finish first)."""
        self.info(model)
        with self._lock:
            self._unloaded.add(model)
        self.cache.evict(model)
