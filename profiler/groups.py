"""Groups (served models over several bases, :mod:`variants.groups`) in the catalog.

A group's floor is compared with every member's accuracy, so the members must have been
evaluated on the same data: :func:`check_group_data` refuses a group whose members were
evaluated on different data (naming the member and the data), and
:func:`load_group_profiles` refuses it again when the catalog is read. Where no labels
exist, a member's quality is its fidelity to the group's *reference*, its most accurate
member (the first listed when none has labelled accuracy): top-1 agreement or cosine on the
same held-out inputs, measured by :func:`measure_group_fidelity` at the end of every
``profile`` run and stored in the catalog's ``group_fidelity`` table.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from profiler.catalog import Catalog
from variants.groups import Group, GroupError, check_members
from variants.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupProfile:
    """A group on one device and backend: its members' profiles (in the group's order,
    unprofiled members left out), the data they were evaluated on, the reference member and
    each member's fidelity to it (None where not measured yet)."""

    name: str
    members: tuple  # VariantProfile, in the group's order
    eval_set: str | None
    reference: str | None
    fidelity: dict[str, float | None] = field(default_factory=dict)
    fidelity_metric: str | None = None

    def quality(self, member: str) -> float | None:
        """What the group's floor is compared with: labelled accuracy, else fidelity to the
        reference."""
        p = next((p for p in self.members if p.name == member), None)
        if p is None:
            return None
        return p.accuracy if p.accuracy is not None else self.fidelity.get(member)


def _evaluated(store: Store, keys: dict[str, str]) -> dict[str, set[str]]:
    """Member name -> the data sets it was evaluated on (any device or backend)."""
    out: dict[str, set[str]] = {n: set() for n in keys}
    if not store.catalog_path.exists():
        return out
    by_key = {k: n for n, k in keys.items()}
    with Catalog(store.catalog_path) as cat:
        for r in cat.conn.execute("SELECT variant_key, eval_set FROM accuracy WHERE "
                                  "status = 'ok'"):
            if r[0] in by_key:
                out[by_key[r[0]]].add(r[1])
    return out


def check_group_data(store: Store | str | Path, members) -> str | None:
    """Check that ``members`` (stored variant names) are interchangeable and were evaluated
    on common data; returns that data's name (None when no member is evaluated yet).

    A member not profiled yet counts with the data ``memadapt profile`` gives it by default
    (``--eval auto``). Raises :class:`~variants.groups.GroupError` naming the first member
    with no data in common with the first and what each was evaluated on.
    """
    from profiler.accuracy import resolve_eval

    store = store if isinstance(store, Store) else Store(store)
    ms = check_members(store, members)
    seen = _evaluated(store, {m.name: m.key for m in ms})
    sets = {}
    for m in ms:
        if seen[m.name]:
            sets[m.name] = (seen[m.name], "was evaluated on")
        else:
            auto = resolve_eval("auto", m)
            sets[m.name] = ({auto} if auto else set(), "is evaluated by default on")
    common = set.intersection(*(s for s, _ in sets.values()))
    if not common:
        ref = ms[0].name
        for m in ms[1:]:
            if not (sets[m.name][0] & sets[ref][0]):
                rs, rv = sets[ref]
                s, v = sets[m.name]
                raise GroupError(
                    f"member {m.name!r} {v} {', '.join(sorted(s)) or 'nothing'} but {ref!r} "
                    f"{rv} {', '.join(sorted(rs)) or 'nothing'}: a group's floor compares "
                    f"accuracies measured on the same data; profile them on one set "
                    f"(`memadapt profile {store.root} --eval DATA --force`) or group other "
                    f"members")
        what = "; ".join(f"{n}: {', '.join(sorted(s))}" for n, (s, _) in sets.items())
        raise GroupError(f"members {', '.join(m.name for m in ms)} were evaluated on no "
                         f"common data ({what}); profile them on one set with `memadapt "
                         f"profile --eval DATA`")
    return sorted(common)[0] if any(seen.values()) else None


def _reference(members) -> str | None:
    labelled = [p for p in members if p.accuracy is not None]
    if labelled:
        best = max(p.accuracy for p in labelled)
        return next(p.name for p in labelled if p.accuracy == best)
    return members[0].name if members else None


def load_group_profiles(store: Store | str | Path, device: str = "cpu",
                        backend: str = "onnxruntime", *, profiles=None) -> list[GroupProfile]:
    """The store's groups with their members' profiles on ``device`` and ``backend``
    (``profiles``: what :func:`profiler.load_profiles` returned, to avoid reading twice).

    Raises :class:`~variants.groups.GroupError` when a group's members were evaluated on
    different data, naming the member and the data.
    """
    from profiler.profiles import load_profiles
    from variants.backends import parse_device

    store = store if isinstance(store, Store) else Store(store)
    groups = store.groups()
    if not groups:
        return []
    if profiles is None:
        profiles = load_profiles(store, device=device, backend=backend)
    by_name = {p.name: p for p in profiles}
    kind, _ = parse_device(device)
    rows = []
    if store.catalog_path.exists():
        with Catalog(store.catalog_path) as cat:
            rows = cat.group_fidelity_rows(kind, backend)
    out = []
    for g in groups:
        members = tuple(by_name[m] for m in g.members if m in by_name)
        evaluated = [p for p in members if p.eval_set is not None]
        data = evaluated[0].eval_set if evaluated else None
        for p in evaluated:
            if p.eval_set != data:
                raise GroupError(f"group {g.name!r}: member {p.name!r} was evaluated on "
                                 f"{p.eval_set} but {evaluated[0].name!r} on {data} "
                                 f"({device}/{backend}); a group's floor compares accuracies "
                                 f"on the same data: profile its members with one --eval")
        ref = _reference(evaluated)
        fid: dict[str, float | None] = {p.name: None for p in members}
        metric = None
        if ref is not None:
            ref_key = by_name[ref].key
            fid[ref] = 1.0
            for r in rows:  # oldest first: the newest measurement wins
                if (r["group_name"] == g.name and r["reference_key"] == ref_key
                        and r["eval_set"] == data and r["variant"] in fid
                        and r["variant_key"] == by_name[r["variant"]].key):
                    fid[r["variant"]] = r["fidelity"]
                    metric = r["fidelity_metric"]
        out.append(GroupProfile(g.name, members, data, ref, fid, metric))
    return out


def measure_group_fidelity(store: Store, cat: Catalog, evaluator, *, device_type: str,
                           backend: str, force: bool = False) -> int:
    """Measure each group member's fidelity to its group's reference on the data they were
    evaluated on, where not stored yet (``force``: again); returns how many were measured.
    A group whose members were evaluated on different data is skipped with a warning (it is
    refused when the catalog is read)."""
    from profiler.accuracy import fidelity
    from profiler.profiles import load_profiles

    groups: list[Group] = store.groups()
    if not groups:
        return 0
    n = 0
    profiles = load_profiles(store, device=device_type, backend=backend)
    try:
        gps = load_group_profiles(store, device_type, backend, profiles=profiles)
    except GroupError as e:
        log.warning("%s; no group fidelity measured", e)
        return 0
    for gp in gps:
        if gp.reference is None or gp.eval_set is None:
            continue
        ref = next(p for p in gp.members if p.name == gp.reference)
        todo = [p for p in gp.members if p.name != gp.reference
                and p.eval_set == gp.eval_set and (force or gp.fidelity.get(p.name) is None)]
        if not todo:
            continue
        ref_m = store.get(ref.name)
        try:
            ref_out = evaluator.outputs(ref_m, evaluator.batches(ref_m, gp.eval_set))
        except Exception as e:  # noqa: BLE001 - logged, and profiling goes on
            log.warning("group %s: reference %s cannot run (%s); no group fidelity", gp.name,
                        ref.name, e)
            continue
        for p in todo:
            m = store.get(p.name)
            t0 = time.perf_counter()
            try:
                batches = evaluator.batches(m, gp.eval_set)
                outs = evaluator.outputs(m, batches)
                if any(np.shape(a)[1:] != np.shape(b)[1:] for a, b in zip(outs, ref_out)):
                    log.warning("group %s: %s and %s give outputs of different shapes; no "
                                "fidelity between them", gp.name, p.name, ref.name)
                    continue
                value, metric = fidelity(outs, ref_out, batches, m.task)
            except Exception as e:  # noqa: BLE001 - logged, and profiling goes on
                log.warning("group %s: fidelity of %s failed: %s", gp.name, p.name, e)
                continue
            cat.upsert_group_fidelity({
                "group_name": gp.name, "variant_key": m.key, "variant": m.name,
                "reference_key": ref.key, "reference": ref.name, "device_type": device_type,
                "backend": backend, "eval_set": gp.eval_set,
                "samples": sum(len(y) for y in outs), "fidelity": value,
                "fidelity_metric": metric})
            log.info("group %s: %s fidelity %.4f to %s (%s, %.1f s)", gp.name, m.name, value,
                     ref.name, metric, time.perf_counter() - t0)
            n += 1
    return n
