"""``generate``: build a base model's variants and store them (idempotent, resumable).

Each variant's key hashes the base model's fingerprint (architecture + every
tensor), its spec chain, the options that shape it and the toolkit version;
a key already in the store is skipped, so re-running after an interrupt only
does what is missing.

A run holds the store's lock (:meth:`variants.Store.lock`) while it writes, so
two runs into one store take turns: the second waits, then skips what the
first stored. It starts by sweeping the staging folders that killed runs left.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from variants._locks import DEFAULT_TIMEOUT
from variants.data import calibration, default_source
from variants.errors import SpecError
from variants.export import export_onnx
from variants.families import Built, family_of, get_family
from variants.specs import EarlyExit, Prune, Quantize, Spec, validate_chain, variant_name
from variants.store import Store, now, toolkit_version, versions
from variants.transforms import TransformContext, onnx_transform, torch_transform
from variants.weights import save_state_dict

log = logging.getLogger(__name__)

#: progress(description, done, total): called as variants and their steps progress
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class GenerateResult:
    name: str
    key: str
    status: str  # "created" or "skipped"
    seconds: float
    params: int
    bytes: int


def plan_chains(prune: Sequence[float] = (), exits: Sequence[int] = (),
                quantize: Sequence[str] = (), combine: bool = False) -> list[tuple[Spec, ...]]:
    """The spec chains to generate: the base, each option alone, or (``combine``) every
    combination of at most one prune, one exit and one quantization, in canonical order."""
    ps = [Prune(r) for r in prune]
    es = [EarlyExit(int(a)) for a in exits]
    qs = [Quantize(q) for q in quantize]
    chains: list[tuple[Spec, ...]] = [()]
    if combine:
        for p in [None, *ps]:
            for e in [None, *es]:
                for q in [None, *qs]:
                    chains.append(tuple(s for s in (p, e, q) if s is not None))
    else:
        chains += [(s,) for s in (*ps, *es, *qs)]
    seen, out = set(), []
    for c in chains:
        c = validate_chain(c)
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def fingerprint(module, arch: dict[str, Any]) -> str:
    """Content hash of a model: its architecture and every tensor's dtype, shape and bytes."""
    import torch

    h = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        t = t.detach().contiguous().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def variant_key(base_fp: str, specs: Sequence[Spec], options: dict[str, Any]) -> str:
    payload = {"base": base_fp, "specs": [s.to_dict() for s in specs],
               "options": options if specs else {}, "toolkit": toolkit_version()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _params(module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def generate(model: str | None, store: Store | str, *,
             prune: Sequence[float] = (), exits: Sequence[int] = (),
             quantize: Sequence[str] = (), combine: bool = False,
             chains: Sequence[Sequence[Spec]] | None = None,
             calib: str | None = None, num_classes: int | None = None,
             weights: str | None = None, pretrained: bool = False, seed: int = 0,
             recover_steps: int | None = None, name: str | None = None,
             module=None, example_inputs=None, family: str | None = None,
             progress: Progress | None = None, lock_timeout: float | None = DEFAULT_TIMEOUT,
             **family_options: Any) -> list[GenerateResult]:
    """Generate and store the base variant of ``model`` and the requested variants.

    ``model`` is a built-in name (``memadapt models``) or, with ``module=`` and
    ``example_inputs=``, the name to give any ``nn.Module``. Returns one result
    per variant, ``status="skipped"`` for those already stored with the same key.
    Another run writing the same store is waited for up to ``lock_timeout``
    seconds (``None``: for ever), then :class:`variants.store.StoreLockedError`.
    """
    import torch

    store = store if isinstance(store, Store) else Store(store, create=True)
    if module is not None:
        fam = get_family(family or "custom")
        if not model:
            raise SpecError("give the custom model a name (model='mynet')")
        family_options = {**family_options, "module": module, "example_inputs": example_inputs}
    else:
        if model is None:
            raise SpecError("give a model name (see `memadapt models`) or module=")
        fam = get_family(family) if family else family_of(model)
    todo = [validate_chain(c) for c in chains] if chains is not None else \
        plan_chains(prune, exits, quantize, combine)
    if () not in todo:
        todo.insert(0, ())

    torch.manual_seed(seed)
    built: Built = fam.build(model, num_classes=num_classes, weights=weights,
                             pretrained=pretrained, **family_options)
    base_arch = built.arch
    for chain in todo:  # validate exit points (and that the family can exit) before any work
        for s in chain:
            if isinstance(s, EarlyExit):
                from variants.exits import check_exit

                check_exit(fam, base_arch, s.at)
    base_name = name or model
    base_fp = fingerprint(built.module, base_arch)
    calib_source = calib or default_source(fam.name)
    options = {"calib": calib_source, "seed": seed, "recover_steps": recover_steps}

    # every prefix of every chain is a variant too (its parent)
    full: list[tuple[Spec, ...]] = []
    for chain in todo:
        for i in range(len(chain) + 1):
            if chain[:i] not in full:
                full.append(chain[:i])
    full.sort(key=len)

    with store.lock(f"generate {base_name}", timeout=lock_timeout):
        swept = store.clean_staging()
        if swept:
            log.info("removed %d staging folders left by interrupted runs", swept)
        return _generate_locked(store, fam, built, model, base_name, base_fp, full, options,
                                calib_source, seed, recover_steps, progress)


def _generate_locked(store: Store, fam, built: Built, model: str, base_name: str, base_fp: str,
                     full: list[tuple[Spec, ...]], options: dict[str, Any], calib_source: str,
                     seed: int, recover_steps: int | None,
                     progress: Progress | None) -> list[GenerateResult]:
    import torch

    base_arch = built.arch
    results: list[GenerateResult] = []
    modules: dict[tuple[Spec, ...], tuple[Any, dict]] = {(): (built.module, base_arch)}
    cal = None
    total = len(full)

    def tick(desc: str, done: int) -> None:
        if progress:
            progress(desc, done, total)

    for i, chain in enumerate(full):
        vname = variant_name(base_name, chain)
        key = variant_key(base_fp, chain, _key_options(fam.name, chain, options))
        tick(vname, i)
        if vname in store and store.get(vname).key == key:
            m = store.get(vname)
            results.append(GenerateResult(vname, key, "skipped", 0.0, m.params, m.bytes))
            continue
        t0 = time.perf_counter()
        if cal is None:
            cal = calibration(fam, base_arch, calib_source, seed=seed)
        ctx = TransformContext(family=fam, base=built.module, base_arch=base_arch, calib=cal,
                               seed=seed, recover_steps=recover_steps,
                               progress=(lambda d, a, b, v=vname: progress(f"{v}: {d}", a, b))
                               if progress else None)
        parent = chain[:-1] if chain else None
        stage = chain[-1].stage if chain else "torch"
        staging = store.staging(vname)
        try:
            weights_file: str | None = None
            export_check = None
            if stage == "torch":
                if chain:
                    pmod, parch = _torch_parent(modules, parent, store, base_name, fam)
                    torch.manual_seed(seed)
                    mod, arch = torch_transform(chain[-1])(copy.deepcopy(pmod), chain[-1],
                                                          copy.deepcopy(parch), ctx)
                else:
                    mod, arch = built.module, base_arch
                mod = mod.eval()
                modules[chain] = (mod, arch)
                check = export_onnx(mod, fam, arch, staging / "model.onnx", seed=seed)
                export_check = check.to_dict()
                save_state_dict(mod, staging / "weights.safetensors")
                weights_file = "weights.safetensors"
                params = _params(mod)
            else:
                src = store.get(variant_name(base_name, parent))
                arch = src.arch
                onnx_transform(chain[-1])(src.onnx_path, staging / "model.onnx", chain[-1],
                                          arch, ctx)
                params = src.params
                ctx.report.update(_compare_to_parent(fam, arch, src.onnx_path,
                                                     staging / "model.onnx", cal))
            manifest = {
                "manifest_version": 1, "name": vname, "key": key, "base": base_name,
                "parent": variant_name(base_name, parent) if chain else None,
                "specs": [s.to_dict() for s in chain], "family": fam.name,
                "model": model, "task": _task(fam, arch), "arch": arch,
                "inputs": [s.to_dict() for s in fam.inputs(arch)],
                "outputs": fam.output_names(arch), "params": params, "onnx": "model.onnx",
                "weights": weights_file, "export_check": export_check, "metrics": ctx.report,
                "versions": versions(), "created": now(), "options": options,
                "base_fingerprint": base_fp,
            }
            m = store.commit(staging, manifest)
        except BaseException:
            store.discard(staging)  # an interrupted build leaves nothing behind
            raise
        dt = time.perf_counter() - t0
        log.info("generated %s (%d params, %d bytes) in %.1fs", vname, params, m.bytes, dt)
        results.append(GenerateResult(vname, key, "created", dt, params, m.bytes))
    tick("done", total)
    return results


def _key_options(family: str, chain: Sequence[Spec], options: dict[str, Any]) -> dict[str, Any]:
    """The options a variant's content depends on: for a chain with a prune or an exit,
    also the family's recovery defaults (steps, rates), so changing them regenerates it
    instead of skipping a variant recovered the old way."""
    if not any(isinstance(s, (Prune, EarlyExit)) for s in chain):
        return options
    import dataclasses

    from variants.recover import recovery_defaults

    return {**options, "recovery": dataclasses.asdict(recovery_defaults(family))}


def _task(fam, arch) -> str:
    from variants.recover import task_kind

    return task_kind(fam, arch)


def _torch_parent(modules, parent, store: Store, base_name: str, fam):
    """The parent's module: from this run, else rebuilt from the store's safetensors."""
    if parent in modules:
        return modules[parent]
    from safetensors.torch import load_file

    m = store.get(variant_name(base_name, parent))
    mod = fam.rebuild(m.arch)
    mod.load_state_dict(load_file(str(m.weights_path)))
    modules[parent] = (mod.eval(), m.arch)
    return modules[parent]


def _compare_to_parent(fam, arch, parent_onnx, child_onnx, cal) -> dict[str, float]:
    """How closely a quantized graph follows its float parent on calibration inputs."""
    import numpy as np

    from variants.backends import open_onnx

    a, b = open_onnx(parent_onnx), open_onnx(child_onnx)
    agree, cos, n = 0.0, 0.0, 0
    for batch in list(cal)[:4]:
        xs = [t.numpy() for t in batch]
        ya, yb = a.run(xs).astype(np.float64), b.run(xs).astype(np.float64)
        fa, fb = ya.reshape(len(ya), -1), yb.reshape(len(yb), -1)
        cos += float((np.sum(fa * fb, 1) / (np.linalg.norm(fa, axis=1) *
                                            np.linalg.norm(fb, axis=1) + 1e-12)).sum())
        if ya.ndim == 2:
            agree += float((ya.argmax(1) == yb.argmax(1)).sum())
        n += len(ya)
    out = {"cosine_to_parent": round(cos / max(n, 1), 6)}
    if _task(fam, arch) == "classification":
        out["top1_agreement_to_parent"] = round(agree / max(n, 1), 6)
    return out
