"""The profiler: isolated memory/latency/load measurements, accuracy and fidelity, the
SQLite catalog (schema, migrations, WAL, upsert, resume), the query API and reports.

Fast tests use the session's tiny store (resnet10 at 32x32, bert-tiny) and a small
MLP trained on digits; the resnet18 checks of the issue's acceptance figures are slow.
No test asserts a timing: only that timings exist and are positive.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import profiler
from profiler import catalog as catalog_mod
from profiler.catalog import Catalog
from profiler.device import device_info
from profiler.memory import MemoryFit, fit_memory, independent_peak
from profiler.profiles import BatchProfile, VariantProfile
from variants import Store

ROOT = Path(__file__).resolve().parent.parent
FAST = {"batches": (1, 4), "runs": 3, "warmup": 1}


def _copy_store(src: Store, dst: Path, pattern: str = "*") -> Store:
    """A private copy (hard links: nothing is modified in place) without the catalog."""
    (dst / "variants").mkdir(parents=True)
    for name in src.names(pattern):
        shutil.copytree(src.variant_dir(name), dst / "variants" / name, copy_function=os.link)
    return Store(dst)


@pytest.fixture(scope="module")
def mlp_store(tmp_path_factory):
    """A tiny MLP trained on digits (a real accuracy) as a custom model, base + int8."""
    import torch

    import variants
    from variants.data import load_data

    torch.manual_seed(0)
    ds = load_data("digits", "train")
    x, y = torch.as_tensor(ds.inputs), torch.as_tensor(ds.labels)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                              torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(80):
        idx = torch.randint(0, len(x), (128,))
        loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    root = tmp_path_factory.mktemp("mlp")
    variants.generate("digitmlp", root, module=net.eval(), example_inputs=torch.zeros(2, 8, 8),
                      quantize=["int8"])
    return Store(root)


@pytest.fixture(scope="module")
def resnet_profiled(tiny_store, tmp_path_factory):
    """resnet10 base + int8 profiled once at batches (1, 4) with the auto eval set."""
    store = _copy_store(tiny_store, tmp_path_factory.mktemp("r10"), "resnet10*")
    calls = []
    results = profiler.profile(store, variants=["resnet10", "resnet10+int8"],
                               progress=lambda *a: calls.append(a), **FAST)
    return store, results, calls


def _rows(store: Store) -> dict[tuple[str, int], sqlite3.Row]:
    with Catalog(store.catalog_path) as cat:
        rows = cat.conn.execute("SELECT * FROM batch_profiles").fetchall()
    return {(r["variant"], r["batch"]): r for r in rows}


# --- catalog ----------------------------------------------------------------------------------


def test_catalog_schema_is_versioned_and_in_wal_mode(tmp_path):
    path = tmp_path / "catalog.sqlite"
    with Catalog(path) as cat:
        assert cat.version == profiler.schema_version() == len(catalog_mod.MIGRATIONS)
        assert cat.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in cat.conn.execute("SELECT name FROM sqlite_master "
                                                 "WHERE type = 'table'")}
    assert {"devices", "batch_profiles", "accuracy", "memory_fits"} <= tables
    with Catalog(path) as cat:  # reopening migrates nothing and keeps the version
        assert cat.version == profiler.schema_version()


def test_catalog_migrations_apply_in_order_and_keep_rows(tmp_path, monkeypatch):
    path = tmp_path / "catalog.sqlite"
    with Catalog(path) as cat:
        cat.record_device(device_info("cpu"))
    extra = ("ALTER TABLE devices ADD COLUMN note TEXT", "UPDATE devices SET note = 'migrated'")
    monkeypatch.setattr(catalog_mod, "MIGRATIONS", [*catalog_mod.MIGRATIONS, extra])
    with Catalog(path) as cat:
        assert cat.version == len(catalog_mod.MIGRATIONS)
        rows = cat.conn.execute("SELECT fingerprint, note FROM devices").fetchall()
    assert [tuple(r) for r in rows] == [(device_info("cpu").fingerprint, "migrated")]


def test_catalog_from_a_newer_memadapt_is_refused(tmp_path):
    path = tmp_path / "catalog.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {profiler.schema_version() + 1}")
    with pytest.raises(profiler.ProfilerError, match="upgrade memadapt"):
        Catalog(path)


def test_catalog_upsert_replaces_a_row_in_place(tmp_path):
    info = device_info("cpu")
    key = {"variant_key": "k1", "variant": "m", "device_fp": info.fingerprint,
           "device_type": "cpu", "backend": "onnxruntime", "batch": 2}
    with Catalog(tmp_path / "c.sqlite") as cat:
        cat.record_device(info)
        cat.upsert_batch({**key, "status": "error", "error": "boom"})
        cat.upsert_batch({**key, "status": "ok", "error": None, "peak_memory_bytes": 123,
                          "allocator": "pinned"})
        rows = cat.batch_rows(info.fingerprint, "onnxruntime")
        assert len(rows) == 1
        assert (rows[0]["status"], rows[0]["error"], rows[0]["peak_memory_bytes"]) == \
            ("ok", None, 123)
        assert cat.done_batches(info.fingerprint, "onnxruntime") == {("k1", 2)}
        with pytest.raises(profiler.ProfilerError, match="unknown batch_profiles columns"):
            cat.upsert_batch({**key, "status": "ok", "bogus": 1})


def test_device_fingerprint_is_stable_and_readable():
    info = device_info("cpu")
    assert info.type == "cpu" and info.cpu and info.gpu is None
    assert re.fullmatch(r"[0-9a-f]{16}", info.fingerprint)
    assert info.fingerprint == device_info("cpu").fingerprint
    assert "onnxruntime" in " ".join(dict(info.versions))


# --- memory fit and Pareto (pure) -------------------------------------------------------------


def test_allocator_pinning():
    from profiler.memory import ALLOCATOR_ENV, allocator_env, pin_allocator

    env = {"PATH": "/bin", **ALLOCATOR_ENV}
    assert allocator_env("pinned", {"PATH": "/bin"}) == env
    assert allocator_env("default", env) == {"PATH": "/bin"}
    with pytest.raises(ValueError, match="pinned"):
        allocator_env("jemalloc", env)
    assert pin_allocator() is True  # glibc: the same setting the measuring child runs with


def test_memory_fit_is_least_squares_with_residual():
    fit = fit_memory([(1, 110), (2, 120), (4, 140), (8, 180)])
    assert fit.static_bytes == pytest.approx(100) and fit.per_sample_bytes == pytest.approx(10)
    assert fit.residual_bytes == pytest.approx(0, abs=1e-6)
    assert fit.predict(16) == 260
    noisy = fit_memory([(1, 110), (2, 125), (4, 140)])
    assert noisy.residual_bytes > 0
    one = fit_memory([(4, 140)], static_bytes=100)  # one batch: through the static point
    assert one.predict(8) == 180 and one.batches == (4,)
    assert fit_memory([]) is None and fit_memory([(4, 140)]) is None


def _vp(name, mem, lat, acc, base="m", fid=None):
    b = BatchProfile(batch=1, status="ok", peak_memory_bytes=mem, latency_p50_s=lat)
    return VariantProfile(name=name, key=name, model=base, base=base, specs=(), params=1,
                          bytes=1, device="cpu", device_fingerprint="x", backend="onnxruntime",
                          batches=(b,), accuracy=acc, fidelity=fid)


def test_pareto_fronts_per_base_and_axis():
    ps = [_vp("big", 100, 1.0, 0.9), _vp("small", 50, 2.0, 0.8), _vp("worse", 60, 3.0, 0.7),
          _vp("fast", 200, 0.5, 0.85), _vp("other", 1, 9.0, None, base="o", fid=1.0)]
    assert profiler.pareto(ps, 1, by=("memory",)) == {"big", "small", "other"}
    assert profiler.pareto(ps, 1, by=("latency",)) == {"big", "fast", "other"}
    assert profiler.pareto(ps, 1) == {"big", "small", "fast", "other"}
    assert profiler.pareto(ps, 2) == set()  # nothing measured or fitted at batch 2
    with pytest.raises(ValueError, match="memory"):
        profiler.pareto(ps, 1, by=("bytes",))


def test_memory_at_prefers_measured_then_fit():
    vp = VariantProfile(name="v", key="v", model="m", base="m", specs=(), params=1, bytes=1,
                        device="cpu", device_fingerprint="x", backend="onnxruntime",
                        batches=(BatchProfile(batch=1, status="ok", peak_memory_bytes=111),),
                        memory_fit=MemoryFit(100.0, 10.0, 0.0, (1, 8)))
    assert vp.memory_at(1) == 111 and vp.memory_at(8) == 180 and vp.predict_memory(4) == 140


# --- profiling real variants ------------------------------------------------------------------


def test_profile_measures_memory_latency_load_and_accuracy(resnet_profiled):
    store, results, calls = resnet_profiled
    assert {(r.variant, r.kind, r.batch, r.status) for r in results} == {
        (v, "batch", b, "ok") for v in ("resnet10", "resnet10+int8") for b in (1, 4)} | {
        (v, "accuracy", None, "ok") for v in ("resnet10", "resnet10+int8")}
    # progress: one bar per variant, counting its batches and its accuracy step
    assert ("resnet10", 0, 3) in calls and ("resnet10", 3, 3) in calls
    ps = {p.name: p for p in profiler.load_profiles(store)}
    assert set(ps) == {"resnet10", "resnet10+int8"}
    base, q = ps["resnet10"], ps["resnet10+int8"]
    for p in ps.values():
        assert p.device == "cpu" and p.backend == "onnxruntime" and p.eval_set == "digits"
        assert p.bytes == store.get(p.name).bytes and p.params > 0
        assert p.load_cold_s > 0 and p.load_warm_s > 0
        assert [b.batch for b in p.batches] == [1, 4]
        for b in p.batches:
            assert b.ok and b.memory_method == "vmhwm" and b.allocator == "pinned"
            assert b.runs == 3 and b.threads >= 1
            assert 0 < b.static_memory_bytes <= b.peak_memory_bytes
            assert 0 < b.latency_p50_s <= b.latency_p95_s <= b.latency_p99_s
            assert b.throughput > 0 and b.latency_std_s >= 0 and b.baseline_bytes > 0
        assert p.memory_fit is not None and p.memory_fit.batches == (1, 4)
        assert p.memory_at(16) == p.predict_memory(16) == p.memory_fit.predict(16)
        assert 0.0 <= p.accuracy <= 1.0
    assert base.fidelity == 1.0 and base.fidelity_metric == "top1_agreement"
    assert 0.5 < q.fidelity <= 1.0
    # 4x fewer weight bytes must show in the isolated measurement
    assert q.batch(1).peak_memory_bytes < base.batch(1).peak_memory_bytes


def test_report_rows_table_and_plot(resnet_profiled, tmp_path):
    from rich.console import Console

    from profiler import report

    store, _, _ = resnet_profiled
    ps = profiler.load_profiles(store)
    rows = report.rows(ps)
    assert len(rows) == 4
    need = {"name", "key", "device", "backend", "batch", "peak_memory_bytes",
            "static_memory_bytes", "latency_p50_s", "latency_p95_s", "load_cold_s",
            "accuracy", "fidelity", "pareto"}
    assert all(need <= set(r) for r in rows)
    json.dumps(rows)  # the CLI's --json
    front = profiler.pareto(ps, 1)
    assert front and {r["name"] for r in rows if r["batch"] == 1 and r["pareto"]} == front
    console = Console(width=200, record=True)
    console.print(report.table(ps))
    text = console.export_text()
    assert "resnet10+int8" in text and "★" in text and "MiB" in text
    png = report.plot(ps, tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_skips_stored_rows_and_force_redoes_them(resnet_profiled):
    store, _, _ = resnet_profiled
    before = {k: r["measured_at"] for k, r in _rows(store).items()}
    again = profiler.profile(store, variants=["resnet10", "resnet10+int8"], **FAST)
    assert {r.status for r in again} == {"skipped"}
    assert {k: r["measured_at"] for k, r in _rows(store).items()} == before
    forced = profiler.profile(store, variants=["resnet10+int8"], batches=(1,), runs=2,
                              warmup=1, eval="none", force=True)
    assert [(r.batch, r.status) for r in forced] == [(1, "ok")]
    after = _rows(store)
    assert after[("resnet10+int8", 1)]["measured_at"] > before[("resnet10+int8", 1)]
    assert after[("resnet10+int8", 4)]["measured_at"] == before[("resnet10+int8", 4)]
    assert len(after) == len(before)  # updated in place, not appended
    # a row measured under another allocator setting is not reused
    other = profiler.profile(store, variants=["resnet10+int8"], batches=(4,), runs=2,
                             warmup=1, eval="none", allocator="default")
    assert [(r.batch, r.status) for r in other] == [(4, "ok")]
    assert _rows(store)[("resnet10+int8", 4)]["allocator"] == "default"


def test_interrupted_run_resumes_without_redoing_stored_work(tiny_store, tmp_path):
    store = _copy_store(tiny_store, tmp_path / "s", "resnet10*")

    def stop_after_first_variant(name, done, total):
        if name != "resnet10":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        profiler.profile(store, eval="none", progress=stop_after_first_variant, **FAST)
    first = _rows(store)
    assert set(first) == {("resnet10", 1), ("resnet10", 4)}
    resumed = profiler.profile(store, eval="none", **FAST)
    by = {(r.variant, r.batch): r.status for r in resumed}
    assert by[("resnet10", 1)] == by[("resnet10", 4)] == "skipped"
    assert {s for (v, _), s in by.items() if v != "resnet10"} == {"ok"}
    second = _rows(store)
    assert all(second[k]["measured_at"] == first[k]["measured_at"] for k in first)
    assert len(second) == 3 * 2


def test_killed_profile_process_resumes(tiny_store, tmp_path):
    """SIGKILL a real `profile` process (and its measuring child) midway, then re-run."""
    store = _copy_store(tiny_store, tmp_path / "s", "resnet10*")
    code = ("import profiler, sys; profiler.profile(sys.argv[1], eval='none', "
            "batches=(1, 4), runs=500, warmup=1)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(store.root)], cwd=ROOT,
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if store.catalog_path.exists() and len(_rows_safe(store)) >= 2:
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first = _rows(store)
    assert 2 <= len(first) < 6, "the run should have been killed midway"
    resumed = profiler.profile(store, eval="none", batches=(1, 4), runs=2, warmup=1)
    skipped = {(r.variant, r.batch) for r in resumed if r.status == "skipped"}
    assert skipped == set(first)
    second = _rows(store)
    assert len(second) == 6 and all(r["status"] == "ok" for r in second.values())
    assert all(second[k]["measured_at"] == first[k]["measured_at"] for k in first)


def _rows_safe(store: Store) -> dict:
    try:
        return _rows(store)
    except (sqlite3.Error, profiler.ProfilerError):
        return {}


def test_failures_are_recorded_and_profiling_goes_on(tiny_store, tmp_path):
    from variants.store import sha256_file

    store = _copy_store(tiny_store, tmp_path / "s", "resnet10*")
    # 1) bytes that no longer match the manifest: caught before any child starts
    bad = store.variant_dir("resnet10+fp16") / "model.onnx"
    bad.unlink()
    bad.write_bytes(b"not an onnx graph")
    # 2) a file that matches its manifest but onnxruntime cannot load: fails in the child
    broken = store.variant_dir("resnet10+int8")
    (broken / "model.onnx").unlink()
    (broken / "model.onnx").write_bytes(b"\x08\x07garbage protobuf")
    mf = json.loads((broken / "manifest.json").read_text())
    mf["files"]["model.onnx"] = {"sha256": sha256_file(broken / "model.onnx"),
                                 "bytes": (broken / "model.onnx").stat().st_size}
    (broken / "manifest.json").unlink()
    (broken / "manifest.json").write_text(json.dumps(mf))

    results = profiler.profile(store, batches=(1,), runs=2, warmup=1)
    status = {(r.variant, r.kind): r for r in results}
    assert status[("resnet10", "batch")].status == "ok"
    assert status[("resnet10", "accuracy")].status == "ok"
    for v in ("resnet10+fp16", "resnet10+int8"):
        assert status[(v, "batch")].status == "error"
        assert status[(v, "accuracy")].status == "error"
    assert "sha256" in status[("resnet10+fp16", "batch")].error
    # the broken file fails where the backend first reads it: optimising it once, or loading
    assert re.search(r"onnxruntime cannot (load|optimise)",
                     status[("resnet10+int8", "batch")].error)
    ps = {p.name: p for p in profiler.load_profiles(store)}
    assert ps["resnet10+int8"].batch(1).status == "error"
    assert ps["resnet10+int8"].memory_at(1) is None and ps["resnet10+int8"].errors
    assert ps["resnet10"].batch(1).ok
    # errors are retried on the next run (they may be fixed); ok rows are not
    again = profiler.profile(store, batches=(1,), runs=2, warmup=1, eval="none")
    assert {r.variant: r.status for r in again} == {
        "resnet10": "skipped", "resnet10+fp16": "error", "resnet10+int8": "error"}


def test_accuracy_of_a_digits_trained_model_is_real(mlp_store, tmp_path):
    from variants.data import load_data

    ev = load_data("digits", "eval")
    npz = tmp_path / "eval.npz"
    np.savez(npz, x=ev.inputs, y=ev.labels)
    profiler.profile(mlp_store, batches=(1,), runs=2, warmup=1, eval="digits")
    profiler.profile(mlp_store, batches=(1,), runs=2, warmup=1, eval=str(npz))
    for eval_set in ("digits", str(npz)):
        ps = {p.name: p for p in profiler.load_profiles(mlp_store, eval_set=eval_set)}
        base, q = ps["digitmlp"], ps["digitmlp+int8"]
        assert base.eval_set == eval_set
        assert base.accuracy > 0.5  # chance is 0.1
        assert base.fidelity == 1.0
        assert abs(q.accuracy - base.accuracy) < 0.1 and q.fidelity > 0.8
    # a user .npz holding the same images gives the same number as the built-in split
    a = {p.name: p.accuracy for p in profiler.load_profiles(mlp_store, eval_set="digits")}
    b = {p.name: p.accuracy for p in profiler.load_profiles(mlp_store, eval_set=str(npz))}
    assert a == b


def test_bert_fidelity_is_cosine_over_tokens(tiny_store, tmp_path):
    store = _copy_store(tiny_store, tmp_path / "s", "bert-tiny*")
    profiler.profile(store, batches=(1,), runs=2, warmup=1, eval_samples=32)
    ps = {p.name: p for p in profiler.load_profiles(store)}
    base, q = ps["bert-tiny"], ps["bert-tiny+int8"]
    assert base.eval_set == "text" and base.fidelity_metric == "cosine"
    assert base.accuracy is None and base.fidelity == pytest.approx(1.0, abs=1e-6)
    assert 0.9 < q.fidelity <= 1.0 + 1e-6
    assert q.batch(1).peak_memory_bytes < base.batch(1).peak_memory_bytes


def test_bad_arguments_say_what_to_do(tiny_store):
    with pytest.raises(profiler.ProfilerError, match="no variant .* matches"):
        profiler.profile(tiny_store, variants="nope*")
    with pytest.raises(profiler.ProfilerError, match="positive integers"):
        profiler.profile(tiny_store, batches=(0,))
    with pytest.raises(profiler.ProfilerError, match="unknown backend"):
        profiler.profile(tiny_store, backend="tensorrt")
    with pytest.raises(profiler.ProfilerError, match="eval set"):
        profiler.profile(tiny_store, eval="/no/such/file.npz")


def test_import_stays_lean():
    code = ("import sys, profiler, profiler.report; "
            "print(sorted(m for m in ('torch', 'onnxruntime', 'matplotlib', 'rich') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


# --- acceptance figures on a ~45 MB ResNet-18 (slow) ------------------------------------------


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    import variants

    root = tmp_path_factory.mktemp("r18")
    variants.generate("resnet18", root, quantize=["int8"], num_classes=10,
                      exits=[2] if "exit" in variants.list_transforms() else ())
    return Store(root)


@pytest.mark.slow
def test_resnet18_int8_and_exit_need_less_memory_than_base(r18):
    profiler.profile(r18, batches=(1,), runs=3, warmup=1, eval="none")
    ps = {p.name: p for p in profiler.load_profiles(r18)}
    assert ps["resnet18"].bytes > 40e6
    base = ps["resnet18"].memory_at(1)
    assert ps["resnet18+int8"].memory_at(1) < base
    if "resnet18+exit2" in ps:
        assert ps["resnet18+exit2"].memory_at(1) < base


@pytest.mark.slow
def test_resnet18_fit_predicts_an_unprofiled_batch(r18):
    profiler.profile(r18, variants=["resnet18"], batches=(1, 8), runs=3, warmup=1, eval="none")
    predicted = profiler.load_profiles(r18)[0].predict_memory(4)
    profiler.profile(r18, variants=["resnet18"], batches=(4,), runs=3, warmup=1, eval="none")
    measured = {p.name: p for p in profiler.load_profiles(r18)}["resnet18"].batch(4)
    assert abs(predicted - measured.peak_memory_bytes) <= 0.10 * measured.peak_memory_bytes


@pytest.mark.slow
def test_resnet18_peak_is_repeatable(r18):
    peaks = []
    for _ in range(2):
        profiler.profile(r18, variants=["resnet18"], batches=(1,), runs=3, warmup=1,
                         eval="none", force=True)
        peaks.append({p.name: p for p in profiler.load_profiles(r18)}["resnet18"]
                     .batch(1).peak_memory_bytes)
    assert abs(peaks[0] - peaks[1]) <= 0.10 * max(peaks)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/bin/time").exists(), reason="needs GNU /usr/bin/time")
def test_resnet18_peak_agrees_with_an_independent_measurement(r18, tmp_path):
    """The profiler's process peak vs /usr/bin/time's max RSS of a separate process that
    only loads the (optimised) ONNX graph with onnxruntime and runs it, minus the max RSS of
    the same imports alone."""
    profiler.profile(r18, variants=["resnet18"], batches=(1,), runs=3, warmup=1, eval="none",
                     force=True)
    b = profiler.load_profiles(r18)[0].batch(1)
    from variants.ort_forms import optimized_graph

    # the profiler measures the backend's load path: the graph optimised once, opened as is
    graph = optimized_graph(r18.get("resnet18")).graph_path
    independent = independent_peak(str(graph), optimized=True)
    assert abs(b.process_peak_bytes - independent) <= 0.10 * independent, \
        (b.process_peak_bytes, independent, b.baseline_bytes)
