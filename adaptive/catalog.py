"""From the profiler's catalog to selection inputs (``ModelDemand`` per model).

This is where measured profiles become the numbers the selector, the cache
and the simulator plan with. Importing it stays light: the profiler's query
API reads SQLite and imports neither torch nor onnxruntime.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from adaptive.errors import AdaptiveError
from adaptive.select import Candidate, ModelDemand

log = logging.getLogger(__name__)


def quality(profile: Any) -> float | None:
    """The accuracy a floor is compared with: labelled accuracy when measured, else the
    variant's fidelity to its base model (1.0 for the base itself)."""
    acc = getattr(profile, "accuracy", None)
    if acc is not None:
        return float(acc)
    fid = getattr(profile, "fidelity", None)
    return None if fid is None else float(fid)


def candidates_from_catalog(store, *, device: str = "cpu", backend: str = "onnxruntime",
                            batch: int = 8) -> dict[str, list[Candidate]]:
    """Each model's (``manifest.base``) candidates: memory at ``batch``, mean run time at
    batch 1 (or the smallest profiled), cold load time (until it can run: the profiler's, less
    the first run it includes) and quality, for one device and backend. The mean, not the
    p50: run times skew right, and a simulated mean latency is to predict the real one.

    A group (:mod:`variants.groups`) is one model whose candidates are its members, with
    quality their accuracy (else their fidelity to the group's most accurate member); a
    member is served under its group's name only, so a base model whose every profiled
    variant is in groups is not a model of its own."""
    import profiler

    profiles = profiler.load_profiles(store, device=device, backend=backend)
    out: dict[str, list[Candidate]] = {}
    skipped = []
    for p in profiles:
        c = _candidate(p, quality(p), batch)
        if c is None:
            skipped.append(p.name)
            continue
        out.setdefault(p.base, []).append(c)
    from variants.groups import GroupError

    try:
        groups = profiler.load_group_profiles(store, device=device, backend=backend,
                                              profiles=profiles)
    except GroupError as e:  # members evaluated on different data
        raise AdaptiveError(str(e)) from None
    members = {p.name for g in groups for p in g.members}
    skipped = [n for n in skipped if n not in members]
    for g in groups:
        cs = [c for c in (_candidate(p, g.quality(p.name), batch) for p in g.members)
              if c is not None]
        missing = [p.name for p in g.members if not any(c.variant == p.name for c in cs)]
        if missing:
            log.warning("group %s: no complete profile (memory, latency, accuracy or fidelity "
                        "to %s) for %s; they are not its candidates", g.name, g.reference,
                        ", ".join(missing))
        if cs:
            out[g.name] = cs
    for m in list(out):
        if m not in {g.name for g in groups}:
            out[m] = [c for c in out[m] if c.variant not in members]
            if not out[m]:
                del out[m]
    if skipped:
        log.warning("no complete profile (memory, latency, accuracy/fidelity) for %s on %s; "
                    "they are not candidates", ", ".join(sorted(skipped)), device)
    if not out:
        raise AdaptiveError(f"the catalog of {getattr(store, 'root', store)} has no complete "
                            f"profiles for device {device!r} and backend {backend!r}; run "
                            f"`memadapt profile STORE --device {device}` first")
    return {m: sorted(cs, key=lambda c: (c.memory_bytes, c.variant)) for m, cs in out.items()}


def _candidate(p: Any, q: float | None, batch: int) -> Candidate | None:
    """``p`` (a VariantProfile) as a Candidate of quality ``q``; None when incomplete."""
    mem = p.memory_at(batch)
    ok = [b for b in p.batches if b.status == "ok"]
    if q is None or mem is None or not ok:
        return None
    lat = min(ok, key=lambda b: b.batch)
    per_request = _run_s(lat) / lat.batch if lat.batch > 1 else _run_s(lat)
    peaks = [b.load_peak_bytes for b in ok if b.load_peak_bytes is not None]
    return Candidate(p.name, int(mem), min(1.0, max(0.0, q)), float(per_request),
                     _load_s(ok), load_peak_bytes=int(max(peaks, default=0)))


def _load_s(ok: Sequence[Any]) -> float:
    """A candidate's load time from its batch profiles: the profiler times a cold load
    through the session's first run, while a Candidate's ``load_s`` is the time until it can
    run (whoever waits for it adds its own ``latency_s``), so that run's steady time comes
    off; what the first run takes beyond it stays a cost of loading."""
    rows = [b for b in ok if b.load_cold_s is not None]
    if not rows:
        return 0.0
    b = min(rows, key=lambda b: b.batch)
    return max(0.0, float(b.load_cold_s) - _run_s(b))


def _run_s(b: Any) -> float:
    """A batch profile's expected run time: its mean, else (older catalogs) its p50."""
    mean = getattr(b, "latency_mean_s", None)
    return float(mean if mean is not None else (b.latency_p50_s or 0.0))


def demands_from_catalog(store, *, device: str = "cpu", backend: str = "onnxruntime",
                         batch: int = 8, floors: Mapping[str, float] | None = None,
                         default_floor: float = 0.0,
                         rates: Mapping[str, float] | None = None) -> list[ModelDemand]:
    """One :class:`ModelDemand` per profiled model, with floors and rates applied."""
    cands = candidates_from_catalog(store, device=device, backend=backend, batch=batch)
    floors, rates = dict(floors or {}), dict(rates or {})
    unknown = sorted((set(floors) | set(rates)) - set(cands))
    if unknown:
        in_group = {m: g.name for g in _groups(store) for m in g.members}
        note = "; ".join(f"{m} is served as part of group {in_group[m]!r}: set its floor or "
                         f"rate there" for m in unknown if m in in_group)
        raise AdaptiveError(f"floors/rates name models {unknown} that have no profiles; "
                            f"profiled models: {', '.join(sorted(cands))}"
                            + (f" ({note})" if note else ""))
    return [ModelDemand(m, cs, floor=floors.get(m, default_floor), rate=rates.get(m, 1.0))
            for m, cs in sorted(cands.items())]


def _groups(store) -> list:
    from variants.store import Store

    return (store if isinstance(store, Store) else Store(store)).groups()


def map_population(families: Sequence[ModelDemand], names: Sequence[str]) -> list[ModelDemand]:
    """Give each requested model name a profiled family: itself when profiled, else the
    families round-robin in order of first appearance (a population of N models from a few
    measured families, each with its own name)."""
    from dataclasses import replace

    by_name = {d.model: d for d in families}
    if not families:
        raise AdaptiveError("no profiled families to build a population from")
    out, k = [], 0
    for n in names:
        if n in by_name:
            out.append(by_name[n])
        else:
            out.append(replace(families[k % len(families)], model=n))
            k += 1
    return out


def demands_to_json(demands: Sequence[ModelDemand]) -> dict[str, Any]:
    """A JSON-ready document of per-model candidates (the ``--profiles`` file format)."""
    return {"version": 1, "families": [
        {"model": d.model, "floor": d.floor, "rate": d.rate,
         **({"slo_s": d.slo_s} if d.slo_s is not None else {}),
         "candidates": [{"variant": c.variant, "memory_bytes": c.memory_bytes,
                         "accuracy": c.accuracy, "latency_s": c.latency_s, "load_s": c.load_s,
                         **({"load_peak_bytes": c.load_peak_bytes} if c.load_peak_bytes
                            else {})}
                        for c in d.candidates]} for d in demands]}


def demands_from_json(path) -> list[ModelDemand]:
    """Read :func:`demands_to_json`'s format (also a bare list of families)."""
    import json
    from pathlib import Path

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise AdaptiveError(f"cannot read profiles from {str(path)!r}: {e}") from None
    fams = data["families"] if isinstance(data, dict) else data
    out = []
    try:
        for f in fams:
            cands = []
            for c in f["candidates"]:
                if isinstance(c, dict):
                    cands.append(Candidate(c["variant"], int(c["memory_bytes"]),
                                           float(c["accuracy"]), float(c.get("latency_s", 0.0)),
                                           float(c.get("load_s", 0.0)),
                                           load_peak_bytes=int(c.get("load_peak_bytes", 0))))
                else:
                    cands.append(Candidate(c[0], int(c[1]), float(c[2]), float(c[3]),
                                           float(c[4])))
            slo = f.get("slo_s")
            out.append(ModelDemand(f["model"], cands, floor=float(f.get("floor", 0.0)),
                                   rate=float(f.get("rate", 1.0)),
                                   slo_s=None if slo is None else float(slo)))
    except (KeyError, TypeError, IndexError, ValueError) as e:
        raise AdaptiveError(f"{str(path)!r} is not a profiles file ({type(e).__name__}: {e}); "
                            f"expected {{'families': [{{'model', 'floor', ['slo_s',] "
                            f"'candidates': "
                            f"[{{'variant', 'memory_bytes', 'accuracy', 'latency_s', "
                            f"'load_s'}}]}}]}}") from None
    return out


def share_candidates(store, candidates: Mapping[str, Sequence[Candidate]], *,
                     backend: str = "torch", device: str = "cpu"
                     ) -> tuple[dict[str, list[Candidate]], dict[str, int]]:
    """``candidates`` (model -> candidates naming stored variants) as
    :class:`~adaptive.sharing.SharedCandidate` objects and the groups' bytes, for hosting
    them in one process that holds identical tensors once (the torch backend with a
    :class:`variants.shared.TensorPool`; ``VariantCache(share_weights=True)``).

    The tensors each (model, variant) has in common with others form groups
    (:func:`variants.shared.sharing_groups` over the variants' safetensors); the rest of a
    candidate's profiled memory is private. A model listed twice (aliases of one stored
    base) shares all of its tensors with itself. Variants without torch weights (ONNX-only
    int8) are an AdaptiveError with the torch backend, which cannot load them. With
    ``backend="onnxruntime"`` the groups are over the tensors of the graphs optimised for
    ``device`` (:func:`variants.ort_forms.ort_tensor_index`), which are what its pooled
    sessions share (ONNX-only variants included).
    """
    from adaptive.sharing import SharedCandidate
    from variants.shared import sharing_groups, tensor_index

    indices = {}
    for model, cands in candidates.items():
        for c in cands:
            if backend == "onnxruntime":
                from variants.ort_forms import ort_tensor_index

                indices[f"{model}/{c.variant}"] = ort_tensor_index(store.get(c.variant), device)
                continue
            path = store.get(c.variant).weights_path
            if path is None:
                raise AdaptiveError(f"model {model!r}: {c.variant!r} has no torch weights (an "
                                    f"ONNX-only variant); shared hosting uses the torch "
                                    f"backend, which cannot load it: drop it from the "
                                    f"candidates")
            indices[f"{model}/{c.variant}"] = tensor_index(path)
    sg = sharing_groups(indices)
    out: dict[str, list[Candidate]] = {}
    for model, cands in candidates.items():
        out[model] = []
        for c in cands:
            label = f"{model}/{c.variant}"
            needs = sg.needs[label]
            if not needs:
                out[model].append(c)
                continue
            private = max(c.memory_bytes - sg.shared_bytes(label), sg.private[label])
            out[model].append(SharedCandidate(c.variant, private, c.accuracy, c.latency_s,
                                              c.load_s, groups=needs))
    log.info("shared hosting: %d groups, %.1f MB shared", len(sg.groups),
             sum(sg.groups.values()) / 1e6)
    return out, dict(sg.groups)
