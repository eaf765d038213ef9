"""The GPU path: memadapt sessions on CUDA, and the device check script.

Tests marked ``gpu`` need a CUDA device and skip cleanly without one (run them on the
device machine, see benchmarks/GPU.md). The one unmarked test runs
``benchmarks/gpu_check.py --cpu-smoke`` so the prepared device script cannot rot unnoticed.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
REPORT_KEYS = {"schema", "date", "mode", "budget_s", "elapsed_s", "stopped_early", "device",
               "versions", "onnxruntime_providers", "plan", "steps", "profiles", "skipped",
               "targets"}


def _cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def gpu_store(tmp_path_factory):
    """resnet10 (10 classes, 32x32): base with torch weights + fp16 ONNX."""
    _cuda()
    import variants

    root = tmp_path_factory.mktemp("gpu-store")
    variants.generate("resnet10", root, quantize=["fp16"], num_classes=10, resolution=32)
    return variants.Store(root)


def _images(n: int = 4) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 3, 32, 32)).astype(np.float32)


@pytest.mark.gpu
def test_torch_backend_runs_on_cuda_like_on_cpu(gpu_store):
    _cuda()
    import variants

    x = _images()
    want = variants.open_session(gpu_store, "resnet10", backend="torch", device="cpu").run(x)
    sess = variants.open_session(gpu_store, "resnet10", backend="torch", device="cuda")
    assert all(p.is_cuda for p in sess.module.parameters())
    got = sess.run(x)
    assert got.shape == want.shape == (4, 10)
    # cuDNN may use TF32 for convolutions: about 1e-3 relative
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-2 * float(np.abs(want).max()))


@pytest.mark.gpu
def test_onnxruntime_cuda_ep_serves_fp32_and_fp16(gpu_store):
    _cuda()
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA execution provider (needs onnxruntime-gpu)")
    import variants

    x = _images()
    want = variants.open_session(gpu_store, "resnet10", device="cpu").run(x)
    scale = float(np.abs(want).max())
    for name, tol in (("resnet10", 1e-2), ("resnet10+fp16", 5e-2)):
        sess = variants.open_session(gpu_store, name, backend="onnxruntime", device="cuda")
        assert sess.providers[0] == "CUDAExecutionProvider"
        got = sess.run(x)
        assert got.shape == want.shape
        np.testing.assert_allclose(got.astype(np.float32), want, rtol=0, atol=tol * scale)


@pytest.mark.gpu
def test_gpu_check_steps_run_on_cuda(tmp_path):
    """The device script's steps on the tiny smoke models, on CUDA: generate, pinned
    bandwidth, the in-place downgrade (device memory freed), profile and serve."""
    _cuda()
    gc = _gpu_check()
    plan = gc.make_plan(gc.parse_args(["--cpu-smoke"]))
    plan = dataclasses.replace(plan, mode="test", device="cuda:0", threads=None)
    sys.path.insert(0, str(SCRIPT.parent))
    from gpu_check_child import run

    out = run({"plan": plan.to_dict(), "steps": list(gc.STEPS), "store": str(tmp_path / "s"),
               "deadline": time.time() + 280})
    res = out["results"]
    assert out["env"]["cuda"] is True and out["env"]["total_memory_bytes"] > 0
    assert all(r["status"] == "ok" for r in res.values()), res
    assert res["bandwidth"]["gbps"] > 1 and res["bandwidth"]["pageable_gbps"] > 0
    for d in res["downgrade"]["models"]:
        assert d["freed_allocated_bytes"] >= d["tail_bytes"] * 0.9 > 0
        assert d["exit_max_rel_diff"] < 1e-2 and d["upgrade_max_rel_diff"] < 1e-2
        assert all(p["max_memory_allocated"] > 0 for p in d["peaks"])
    tight = res["serve"]["phases"][1]
    assert tight["bytes_resident"] <= tight["budget_bytes"]


def test_gpu_check_cpu_smoke_runs_the_library(tmp_path):
    """The whole device script on the CPU with tiny models, through variants.generate,
    profiler.profile, the in-place downgrade and a VariantCache: results land in --out."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(tmp_path),
                           "--store", str(tmp_path / "store")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (js,) = tmp_path.glob("gpu-*.json")
    (md,) = tmp_path.glob("gpu-*.md")
    report = json.loads(js.read_text())
    assert report.keys() >= REPORT_KEYS
    assert report["mode"] == "cpu-smoke" and report["schema"] == 2
    steps = report["steps"]
    assert {k: v["status"] for k, v in steps.items()} == dict.fromkeys(
        ("generate", "bandwidth", "downgrade", "profile", "serve"), "ok")
    # generated by variants.generate: the store holds every variant the report names
    import variants

    store = variants.Store(tmp_path / "store")
    made = {v["name"] for v in steps["generate"]["variants"]}
    assert made == {"resnet10", "resnet10+prune0.5", "resnet10+exit2", "resnet10+fp16",
                    "bert-tiny", "bert-tiny+prune0.5", "bert-tiny+exit1", "bert-tiny+fp16"}
    assert made <= set(store.names())
    # profiled by profiler.profile: every variant with onnxruntime, torch-weighted ones with
    # torch, and the rows come from the store's catalog
    rows = {(r["name"], r["backend"]) for r in report["profiles"] if r["status"] == "ok"}
    assert {(n, "onnxruntime") for n in made} <= rows
    assert {(n, "torch") for n in made if "fp16" not in n} <= rows
    assert steps["bandwidth"]["gbps"] > 0
    for d in steps["downgrade"]["models"]:
        assert d["status"] == "ok" and d["freed_bytes"] == d["tail_bytes"] > 0
        assert d["exit_max_rel_diff"] < 1e-5 and d["upgrade_max_rel_diff"] < 1e-5
    phases = {p["phase"]: p for p in steps["serve"]["phases"]}
    for p in phases.values():
        assert p["bytes_resident"] <= p["budget_bytes"]
    roomy = {x["model"]: x["variant"] for x in phases["roomy"]["served"]}
    tight = {x["model"]: x["variant"] for x in phases["tight"]["served"]}
    # which variant is "best" comes from measured memory and fidelity on random inputs, so
    # the tight budget may find the cache already at its smallest variants; a model first
    # served at its fastest variant may also finish an upgrade that still fits the tight
    # budget: when a model's variant changed, the cache counted the swap or eviction
    if roomy != tight:
        t = phases["tight"]
        assert t["downgrades"] + t["upgrades"] + t["evictions"] > 0
    targets = report["targets"]
    assert targets["fp16_half_weights"]["met"] is True
    assert targets["swaps_reproduce_outputs"]["met"] is True
    assert targets["cache_follows_budget"]["met"] is True
    assert targets["profiler_peak_vs_allocator"]["met"] is None  # no GPU memory on the CPU
    text = md.read_text()
    assert "## Targets" in text and "| resnet | fp16 | resnet10+fp16 |" in text


_MECHANISMS = re.compile(r"prun|exit_?head|(^|_)heads?(_|$)|exit_split|drop_tail|attach_tail|"
                         r"truncat", re.I)


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks").glob("*.py")),
                         ids=lambda p: p.name)
def test_benchmarks_define_no_pruning_or_exit_heads(path):
    """Benchmarks call the library: none defines a pruner, an exit head, a torch module or
    its own in-place downgrade (what a device run certifies must be what memadapt ships)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            assert not _MECHANISMS.search(node.name), f"{path.name}: {node.name}"
        if isinstance(node, ast.ClassDef):
            bases = [ast.unparse(b) for b in node.bases]
            assert not any(b.endswith("Module") for b in bases), f"{path.name}: {node.name}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            assert not any(n.startswith("torch_pruning") for n in names), path.name
