"""Benchmark of pruned and early-exit variants with accuracy recovery (the issue's numbers).

1. Digits ResNet-18 (10 classes, trained 3 epochs at 32x32): generate prune0.5,
   exit1..3 and prune0.5+exit2 with the default recovery; report each variant's
   parameters relative to the base, labelled accuracy on the held-out digits split
   before and after recovery (absolute and as a fraction of the base's), fidelity
   (top-1 agreement with the base) and how long recovery took. Acceptance: prune0.5
   keeps >= 95% of the base accuracy, exit3 >= 90%.
2. The acceptance command ``memadapt generate resnet18 --prune 0.5 --exit 2 --quantize
   int8 --combine`` (1000 classes, random init, default options): every variant
   loads in onnxruntime and returns (B, 1000) logits for B = 1 and 4; prune0.5 <= 30%
   and exit2 <= 15% of the base's parameters.
3. MiniLM (real all-MiniLM-L6-v2 weights): prune0.5 and exit3 with the default
   recovery; token cosine fidelity to the base on held-out text before and after
   (target >= 0.9), and a run of each ONNX graph at B = 1 and 4.

Results go to ``results/recovery.json`` and ``results/recovery.md``.

Run:  nice python benchmarks/recovery.py      (about 15 minutes on 2 shared cores)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

import variants  # noqa: E402
from variants import EarlyExit, Prune  # noqa: E402
from variants.train import train  # noqa: E402

log = logging.getLogger("benchmarks.recovery")

RESULTS = Path(__file__).resolve().parent / "results"
DIGITS_CHAINS = [(Prune(0.5),), (EarlyExit(1),), (EarlyExit(2),), (EarlyExit(3),),
                 (Prune(0.5), EarlyExit(2))]


def _variant_row(store, name: str, base_params: int) -> dict:
    m = store.get(name)
    row = {"variant": name, "params": m.params, "params_ratio": m.params / base_params}
    keys = ("accuracy_base", "accuracy_before", "accuracy_after", "fidelity_metric",
            "fidelity_before", "fidelity_reconstructed", "fidelity_after", "recover_steps",
            "recover_seconds", "recover_mode")
    row.update({k: m.metrics[k] for k in keys if k in m.metrics})
    if "accuracy_after" in row:
        row["accuracy_kept"] = row["accuracy_after"] / row["accuracy_base"]
    return row


def digits_resnet18(work: Path) -> dict:
    fam = variants.get_family("resnet")
    built = fam.build("resnet18", num_classes=10, resolution=32)
    t0 = time.perf_counter()
    trained = train(built.module, fam, built.arch, epochs=3, out=work / "r18.safetensors")
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = variants.generate("resnet18", work / "digits", weights=str(work / "r18.safetensors"),
                                num_classes=10, resolution=32, chains=DIGITS_CHAINS)
    gen_s = time.perf_counter() - t0
    store = variants.Store(work / "digits")
    base = store.get("resnet18")
    rows = [_variant_row(store, r.name, base.params) for r in results if r.name != "resnet18"]
    for row, r in zip(rows, (r for r in results if r.name != "resnet18")):
        row["generate_seconds"] = r.seconds
    return {"base_accuracy": trained.eval_accuracy, "base_params": base.params,
            "train_seconds": train_s, "generate_seconds": gen_s, "variants": rows}


def _shapes(store, name: str, make_inputs) -> list[list[int]]:
    sess = variants.open_session(store, name)
    return [list(sess.run(make_inputs(b)).shape) for b in (1, 4)]


def acceptance_resnet18(work: Path) -> dict:
    t0 = time.perf_counter()
    variants.generate("resnet18", work / "acceptance", prune=[0.5], exits=[2],
                      quantize=["int8"], combine=True)
    gen_s = time.perf_counter() - t0
    store = variants.Store(work / "acceptance")
    base = store.get("resnet18").params
    rng = np.random.default_rng(0)

    def images(b):
        return rng.standard_normal((b, 3, 224, 224), dtype=np.float32)

    rows = [{"variant": n, "params": store.get(n).params,
             "params_ratio": store.get(n).params / base,
             "onnx_output_shapes_b1_b4": _shapes(store, n, images)} for n in store.names()]
    ok = all(r["onnx_output_shapes_b1_b4"] == [[1, 1000], [4, 1000]] for r in rows)
    ratio = {r["variant"]: r["params_ratio"] for r in rows}
    return {"generate_seconds": gen_s, "variants": rows, "all_load_and_run": ok,
            "prune0.5_ratio_ok": ratio["resnet18+prune0.5"] <= 0.30,
            "exit2_ratio_ok": ratio["resnet18+exit2"] <= 0.15}


def minilm(work: Path) -> dict:
    t0 = time.perf_counter()
    results = variants.generate("minilm", work / "minilm", prune=[0.5], exits=[3])
    gen_s = time.perf_counter() - t0
    store = variants.Store(work / "minilm")
    base = store.get("minilm")
    fam = variants.get_family("bert")

    def texts(b):
        ids, mask = fam.data_inputs(base.arch, ["A short sentence.", "Another, longer one "
                                                "about memory-adaptive model caching."] * 2)
        return [ids[:b].numpy(), mask[:b].numpy()]

    rows = []
    for r in results:
        if r.name == "minilm":
            continue
        row = _variant_row(store, r.name, base.params)
        row["generate_seconds"] = r.seconds
        row["onnx_output_shapes_b1_b4"] = _shapes(store, r.name, texts)
        rows.append(row)
    return {"base_params": base.params, "generate_seconds": gen_s, "variants": rows}


def _fmt(v, pct: bool = False) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{100 * v:.1f}%" if pct else f"{v:.4f}"
    return str(v)


def markdown(res: dict) -> str:
    d, a, m = res["digits_resnet18"], res["acceptance_resnet18"], res["minilm"]
    out = ["# Recovery benchmark: pruned and early-exit variants", "",
           f"Machine: {res['machine']}. Total {res['seconds']:.0f} s.", "",
           f"## Digits ResNet-18 (base eval accuracy {d['base_accuracy']:.4f}, "
           f"{d['base_params']:,} params; trained in {d['train_seconds']:.0f} s)", "",
           "| variant | params | of base | acc. before | acc. after | of base acc. | "
           "top-1 agreement before -> after | recovery | steps | s |",
           "|---|---:|---:|---:|---:|---:|---|---|---:|---:|"]
    for r in d["variants"]:
        out.append(f"| {r['variant']} | {r['params']:,} | {_fmt(r['params_ratio'], True)} | "
                   f"{_fmt(r.get('accuracy_before'))} | {_fmt(r.get('accuracy_after'))} | "
                   f"{_fmt(r.get('accuracy_kept'), True)} | {_fmt(r['fidelity_before'])} -> "
                   f"{_fmt(r['fidelity_after'])} | {r['recover_mode']} | "
                   f"{r['recover_steps']} | {r['recover_seconds']:.1f} |")
    out += ["", "## Acceptance: `generate resnet18 --prune 0.5 --exit 2 --quantize int8 "
            "--combine` (1000 classes, random init)", "",
            f"Generated in {a['generate_seconds']:.0f} s. All load in onnxruntime and return "
            f"(B, 1000) for B = 1, 4: **{a['all_load_and_run']}**; prune0.5 <= 30%: "
            f"**{a['prune0.5_ratio_ok']}**; exit2 <= 15%: **{a['exit2_ratio_ok']}**.", "",
            "| variant | params | of base | ONNX output shapes (B=1, B=4) |", "|---|---:|---:|---|"]
    for r in a["variants"]:
        out.append(f"| {r['variant']} | {r['params']:,} | {_fmt(r['params_ratio'], True)} | "
                   f"{r['onnx_output_shapes_b1_b4']} |")
    out += ["", f"## MiniLM (all-MiniLM-L6-v2, {m['base_params']:,} params), held-out text",
            "", "| variant | params | of base | token cosine before | least-squares | after | "
            "recovery | steps | s | ONNX shapes (B=1, B=4) |",
            "|---|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    for r in m["variants"]:
        out.append(f"| {r['variant']} | {r['params']:,} | {_fmt(r['params_ratio'], True)} | "
                   f"{_fmt(r['fidelity_before'])} | {_fmt(r.get('fidelity_reconstructed'))} | "
                   f"{_fmt(r['fidelity_after'])} | "
                   f"{r['recover_mode']} | {r['recover_steps']} | {r['recover_seconds']:.0f} | "
                   f"{r['onnx_output_shapes_b1_b4']} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", help="folder for the stores (default: a temporary folder)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("onnxscript", "onnx_ir", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        res = {"machine": f"{platform.processor() or platform.machine()}, "
                          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}"}
        for key, fn in (("digits_resnet18", digits_resnet18),
                        ("acceptance_resnet18", acceptance_resnet18), ("minilm", minilm)):
            log.info("running %s", key)
            res[key] = fn(work)
        res["seconds"] = time.perf_counter() - t0
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "recovery.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    (RESULTS / "recovery.md").write_text(markdown(res))
    sys.stdout.write(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
