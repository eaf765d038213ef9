"""The cache's per-model state and what it is built from: candidates from the profiler's
catalog, the default loader, shared groups checked against the candidates, and the small
helpers around a load (batch size of a request, trimming the allocator after a release).
Below :mod:`adaptive.cache`, which owns the lock that guards all of it."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from adaptive.errors import AdaptiveError
from adaptive.select import Candidate, ModelDemand
from adaptive.sessions import Entry as _Entry

__all__ = ["CandidateSource", "Loader", "catalog_candidates", "default_loader"]

#: (store, device, backend, max_batch) -> {model: candidates}; see :func:`catalog_candidates`.
CandidateSource = Callable[[Any, str, str, int], Mapping[str, Sequence[Candidate]]]
#: (manifest, device, backend, source or None) -> a session with ``run(inputs)``.
Loader = Callable[[Any, str, str, Any], Any]


def default_loader(manifest: Any, device: str, backend: str, source: Any, *,
                   threads: int | None = None, pool: Any = None) -> Any:
    """Open a stored variant with the registered ``backend`` (from its host form when given;
    through the tensor ``pool`` when given)."""
    from variants.backends import get_backend

    extra = {} if pool is None else {"pool": pool}
    return get_backend(backend)(manifest, device=device, threads=threads, source=source,
                                **extra)


def catalog_candidates(store: Any, device: str, backend: str,
                       max_batch: int) -> dict[str, list[Candidate]]:
    """Candidates per model from the profiler's catalog, memory at ``max_batch``.

    The default :data:`CandidateSource`: ``adaptive.catalog.candidates_from_catalog``, which
    raises an :class:`AdaptiveError` naming ``memadapt profile`` when nothing is profiled.
    """
    fix = (f"run `memadapt profile {getattr(store, 'root', store)} --device {device}` first, or "
           f"pass candidates= to VariantCache")
    try:
        from adaptive.catalog import candidates_from_catalog
    except ImportError as e:
        raise AdaptiveError(f"no profiles to choose variants with (adaptive.catalog is not "
                            f"available: {e}); {fix}") from None
    got = candidates_from_catalog(store, device=device, backend=backend, batch=max_batch)
    out = {m: list(c) for m, c in got.items() if c}
    if not out:
        raise AdaptiveError(f"the catalog of {getattr(store, 'root', store)} has no profiles for "
                            f"device {device!r}, backend {backend!r}; {fix}")
    return out


class _Model:
    """Per-model state, all guarded by the cache's lock."""

    __slots__ = ("name", "index", "cands", "shared", "private", "needs", "excess", "index_of",
                 "floor", "current", "pending", "job", "stalling", "since", "requests", "hits",
                 "served", "acc_sum", "ready_at", "ready_kind")

    def __init__(self, name: str, cands: Sequence[Candidate], floor: float,
                 groups: Mapping[str, int]):
        self.name = name
        self.index = -1  # position in the cache's model order (the decisions' numbering)
        # ``shared``: as given (private bytes + groups); ``cands``: each as if alone (private
        # + every group it needs), what a model costs in an otherwise empty cache.
        self.shared = tuple(cands)
        self.private = tuple(int(c.memory_bytes) for c in self.shared)
        self.needs = tuple(frozenset(getattr(c, "groups", ())) for c in self.shared)
        self.cands = tuple(
            c if not n else Candidate(c.variant, p + sum(groups[g] for g in n), c.accuracy,
                                      c.latency_s, c.load_s, c.load_peak_bytes)
            for c, p, n in zip(self.shared, self.private, self.needs))
        # bytes a load holds above its steady size while it loads (its profiled load peak)
        self.excess = tuple(max(0, c.load_peak_bytes - c.memory_bytes) for c in self.cands)
        self.index_of = {c.variant: k for k, c in enumerate(self.cands)}
        self.floor = floor
        self.current: _Entry | None = None
        self.pending: Any = None  # the re-planning rules' pending cold load
        self.job: Any = None  # the policy path's load in progress (adaptive.cache_policy)
        self.stalling = False  # its variant was broken before its replacement loaded
        # on the cache's clock, when its last load (or break-before-make swap) ended
        self.ready_at = -math.inf
        self.ready_kind = "misses"
        self.since = 0  # when it last became resident (a sequence number): residency order
        self.requests = 0
        self.hits = 0
        self.served = 0
        self.acc_sum = 0.0

    def demand(self, rate: float = 0.0, cands: Sequence[Candidate] | None = None,
               slo_s: float | None = None) -> ModelDemand:
        return ModelDemand(self.name, self.cands if cands is None else cands, self.floor, rate,
                           slo_s=slo_s)


def _trim_allocator(device: str) -> None:
    """Hand freed heap pages back to the OS after a session is released (glibc's
    ``malloc_trim``; a no-op elsewhere)."""
    if device != "cpu":
        return
    from profiler.memory import malloc_trim

    malloc_trim()


def _batch_size(inputs: Any) -> int | None:
    """The leading dimension of the first input (an array, or a nested list)."""
    if isinstance(inputs, Mapping):
        first = next(iter(inputs.values()), None)
    elif isinstance(inputs, (list, tuple)):
        first = inputs[0] if inputs else None
    else:
        first = inputs
    shape = getattr(first, "shape", None)
    if shape is not None:
        return int(shape[0]) if len(shape) else None
    if isinstance(first, (list, tuple)):
        return len(first)
    return None


def _checked_groups(candidates: Mapping[str, Sequence[Candidate]],
                    groups: Mapping[str, int]) -> dict[str, int]:
    """``groups`` validated against the groups the candidates name."""
    from adaptive.sharing import check_groups

    try:
        out = check_groups(groups)
    except ValueError as e:
        raise AdaptiveError(str(e)) from None
    for model, cands in candidates.items():
        for c in cands:
            unknown = sorted(frozenset(getattr(c, "groups", ())) - out.keys())
            if unknown:
                raise AdaptiveError(f"model {model!r}: candidate {c.variant!r} needs groups "
                                    f"{unknown} that groups= does not size; known: "
                                    f"{sorted(out) or 'none'}")
    used = {g for cands in candidates.values() for c in cands for g in getattr(c, "groups", ())}
    return {g: b for g, b in out.items() if g in used}
