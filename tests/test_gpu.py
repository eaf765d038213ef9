"""The GPU path: memadapt sessions on CUDA, and the device check script.

Tests marked ``gpu`` need a CUDA device and skip cleanly without one (run them on the
device machine, see benchmarks/GPU.md). The one unmarked test runs
``benchmarks/gpu_check.py --cpu-smoke`` so the prepared device script cannot rot unnoticed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
VARIANT_KEYS = {"kind", "model", "variant", "status", "params", "weights_bytes", "batches",
                "swaps"}
REPORT_KEYS = {"schema", "date", "mode", "budget_s", "elapsed_s", "stopped_early", "device",
               "versions", "imports", "onnxruntime_providers", "plan", "bandwidth", "variants",
               "onnxruntime", "skipped", "targets"}


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
def test_gpu_check_child_measures_on_cuda(tmp_path):
    """The device script's CUDA code (pinned copies, memory readings, swaps, the in-place
    downgrade) on a tiny ResNet, in one child, as the full run does per variant."""
    _cuda()
    gc = _gpu_check()
    plan = gc.make_plan(gc.parse_args(["--cpu-smoke"]))
    plan = dataclasses.replace(plan, mode="test", device="cuda:0", half="float16",
                               bandwidth_mib=16, host_reps=2)
    spec = {"plan": dataclasses.asdict(plan), "deadline": time.time() + 240,
            "workdir": str(tmp_path),
            "jobs": [{"kind": "bandwidth"}, {"kind": "torch", "model": "resnet",
                                             "variant": "exit"}]}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--child", json.dumps(spec)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    line = [x for x in proc.stdout.splitlines() if x.startswith(gc.RESULT_MARK)]
    assert line, proc.stderr[-3000:]
    out = json.loads(line[-1][len(gc.RESULT_MARK):])
    bw, var = out["results"]
    assert bw["status"] == "ok" and bw["pinned_h2d_gbps"] > 1, bw
    assert var["status"] == "ok", var
    assert out["env"]["context_bytes"] > 0 and var["weights_bytes"] > 0
    for b in var["batches"]:
        assert b["max_memory_allocated"] > var["weights_bytes"] // 2
        assert b["process_bytes"] > b["max_memory_allocated"]
        assert b["peak_ratio"] > 0.5
    host = var["swaps"]["host"]["methods"]
    assert all(m["gbps"] > 0 and m["max_rel_diff"] < 1e-2 for m in host.values())
    assert var["swaps"]["cold"]["max_rel_diff"] < 1e-2
    down = var["swaps"]["downgrade"]
    assert down["freed_allocated_bytes"] >= down["tail_bytes"] * 0.9
    assert down["upgrade_max_rel_diff"] < 1e-2


def test_gpu_check_cpu_smoke_writes_results(tmp_path):
    """The whole device script on the CPU with tiny models: results land in --out."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (js,) = tmp_path.glob("gpu-*.json")
    (md,) = tmp_path.glob("gpu-*.md")
    report = json.loads(js.read_text())
    assert report.keys() >= REPORT_KEYS
    assert report["mode"] == "cpu-smoke" and report["schema"] == 1
    assert report["bandwidth"]["status"] == "ok" and report["bandwidth"]["pinned_h2d_gbps"] > 0
    got = {(r["model"], r["variant"]): r for r in report["variants"]}
    assert set(got) == {(m, v) for m in ("resnet", "bert")
                        for v in ("fp32", "fp16", "exit", "prune0.5")}
    for r in got.values():
        assert r.keys() >= VARIANT_KEYS and r["status"] == "ok", r
        assert [b["batch"] for b in r["batches"]] == [1, 2]
        assert all(b["p50_s"] > 0 for b in r["batches"])
        swaps = r["swaps"]
        assert swaps["cold"]["best_total_s"] > 0 and swaps["cold_over_host"] > 0
        assert {"per_tensor", "flat", "flat_prealloc"} <= swaps["host"]["methods"].keys()
    for model in ("resnet", "bert"):
        down = got[(model, "exit")]["swaps"]["downgrade"]
        assert down["tail_bytes"] > 0
        assert down["exit_output_shapes"] == [down["full_output_shape"]]
        assert got[(model, "prune0.5")]["params"] < got[(model, "fp32")]["params"]
    assert [r["status"] for r in report["onnxruntime"]] == ["ok"]
    targets = report["targets"]
    assert targets["fp16_half_weights"]["met"] is True
    assert targets["swaps_reproduce_outputs"]["met"] is True
    assert targets["profiler_peak_vs_allocator"]["met"] is None  # no GPU memory on the CPU
    assert targets["host_upgrade_vs_pinned"]["values"]
    text = md.read_text()
    assert "## Targets" in text and "| resnet18 | fp32 |" in text
