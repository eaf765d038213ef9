"""`memadapt serve` over real HTTP on loopback, driven by the real tritonclient.

The server is the CLI in a subprocess, serving the tiny store (resnet10 at 32x32 and
bert-tiny) with made-up memory charges so that budgets force swaps.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest

tritonhttp = pytest.importorskip("tritonclient.http")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

import variants  # noqa: E402
from adaptive import Candidate, ModelDemand  # noqa: E402
from adaptive.catalog import demands_to_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MB = 1_000_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_profiles(path: Path) -> Path:
    """Made-up memory charges on the tiny store's real variants."""
    ds = [ModelDemand("resnet10", [Candidate("resnet10", 300 * MB, 0.95),
                                   Candidate("resnet10+fp16", 150 * MB, 0.94),
                                   Candidate("resnet10+int8", 80 * MB, 0.93)], floor=0.9),
          ModelDemand("bert-tiny", [Candidate("bert-tiny", 200 * MB, 1.0),
                                    Candidate("bert-tiny+int8", 60 * MB, 0.98)])]
    path.write_text(json.dumps(demands_to_json(ds)))
    return path


def wait_ready(proc, base: str, timeout_s: float) -> None:
    """Poll ``base``'s readiness until it answers 200; fail with the server's output if it
    exits, or kill it and fail after ``timeout_s``."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited: {proc.stdout.read()}")
        try:
            if httpx.get(base + "/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    pytest.fail(f"the server at {base} was not ready after {timeout_s:.0f} s")


@pytest.fixture(scope="module")
def server(tiny_store, tmp_path_factory):
    profiles = tiny_profiles(tmp_path_factory.mktemp("srv") / "profiles.json")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", str(tiny_store.root), "--profiles",
         str(profiles), "--budget", "1GB", "--port", str(port), "--threads", "1",
         "--max-request-bytes", "2MB", "--rebalance-s", "0.5", "--slo", "500"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    wait_ready(proc, base, 120)
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture()
def client(server):
    c = tritonhttp.InferenceServerClient(server.removeprefix("http://"), network_timeout=120)
    yield c
    c.close()


def _image(b=2):
    return np.random.default_rng(0).standard_normal((b, 3, 32, 32)).astype(np.float32)


def _text(b=2, t=6):
    ids = np.random.default_rng(1).integers(1000, 30000, (b, t)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def _inputs(arrays: dict, binary: bool = True):
    out = []
    for name, a in arrays.items():
        i = tritonhttp.InferInput(name, list(a.shape), "FP32" if a.dtype == np.float32 else
                                  "INT64")
        i.set_data_from_numpy(a, binary_data=binary)
        out.append(i)
    return out


def _status(excinfo) -> int:
    return int(excinfo.value.status())


def test_ready_and_metadata(client, tiny_store):
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert {"binary_tensor_data", "model_repository"} <= set(meta["extensions"])
    m = client.get_model_metadata("resnet10")
    assert m["versions"] == ["resnet10", "resnet10+fp16", "resnet10+int8"]
    assert m["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, -1, -1]}]
    assert m["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    b = client.get_model_metadata("bert-tiny")
    assert [(t["name"], t["datatype"]) for t in b["inputs"]] == [
        ("input_ids", "INT64"), ("attention_mask", "INT64")]
    assert client.get_model_metadata("bert-tiny", model_version="bert-tiny+int8")["name"] == \
        "bert-tiny"
    assert client.is_model_ready("resnet10")


@pytest.mark.parametrize("model,arrays,output", [
    ("resnet10", {"input": _image()}, "logits"),
    ("bert-tiny", _text(), "last_hidden_state"),
])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_equals_the_served_variants_session(client, tiny_store, model, arrays, output,
                                                  binary):
    outputs = None if binary else [tritonhttp.InferRequestedOutput(output, binary_data=False)]
    res = client.infer(model, _inputs(arrays, binary), outputs=outputs, request_id="r1")
    resp = res.get_response()
    variant = resp["parameters"]["memadapt_variant"]
    assert variant in client.get_model_metadata(model)["versions"]
    assert resp["model_version"] == variant and resp["id"] == "r1"
    got = res.as_numpy(output)
    want = variants.open_session(tiny_store, variant, threads=1).run(arrays)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("model,arrays,needle", [
    ("resnet10", {"input": np.zeros((2, 3, 32), np.float32)}, "input 'input' has shape"),
    ("resnet10", {"input": np.zeros((2, 1, 32, 32), np.float32)}, "input 'input' has shape"),
    ("resnet10", {"input": np.zeros((9, 3, 32, 32), np.float32)}, "input 'input': batch"),
    ("bert-tiny", {"input_ids": np.ones((1, 4), np.int64)}, "attention_mask"),
    ("bert-tiny", {"input_ids": np.ones((1, 4), np.int64),
                   "attention_mask": np.ones((2, 4), np.int64)}, "batch sizes"),
])
def test_wrong_shape_is_400_naming_the_input(client, model, arrays, needle):
    with pytest.raises(InferenceServerException) as e:
        client.infer(model, _inputs(arrays))
    assert _status(e) == 400 and needle in e.value.message()


def test_wrong_datatype_is_400_naming_the_input(client):
    i = tritonhttp.InferInput("input", [1, 3, 32, 32], "FP64")
    i.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float64))
    with pytest.raises(InferenceServerException) as e:
        client.infer("resnet10", [i])
    assert _status(e) == 400 and "input 'input' has datatype 'FP64'" in e.value.message()
    i = tritonhttp.InferInput("input_ids", [1, 4], "FP32")
    i.set_data_from_numpy(np.zeros((1, 4), np.float32))
    m = tritonhttp.InferInput("attention_mask", [1, 4], "INT64")
    m.set_data_from_numpy(np.ones((1, 4), np.int64))
    with pytest.raises(InferenceServerException) as e:
        client.infer("bert-tiny", [i, m])
    assert _status(e) == 400 and "input_ids" in e.value.message()


def test_unknown_model_is_404(client):
    with pytest.raises(InferenceServerException) as e:
        client.infer("nosuch", _inputs({"input": _image(1)}))
    assert _status(e) == 404 and "nosuch" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("nosuch")
    assert _status(e) == 404
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("resnet10", model_version="resnet10+prune0.9")
    assert _status(e) == 404
    assert not client.is_model_ready("nosuch")


@pytest.mark.parametrize("version", ["1", "resnet10+int8"])
def test_versioned_routes_serve_the_model(client, tiny_store, version):
    # tritonclient sends /v2/models/M/versions/V/... whenever model_version is given
    x = _image(1)
    res = client.infer("resnet10", _inputs({"input": x}), model_version=version)
    variant = res.get_response()["model_version"]
    assert variant == res.get_response()["parameters"]["memadapt_variant"]
    want = variants.open_session(tiny_store, variant, threads=1).run({"input": x})
    np.testing.assert_allclose(res.as_numpy("logits"), want, atol=1e-4)
    assert client.get_model_metadata("resnet10", model_version=version)["name"] == "resnet10"
    if version == "1":
        assert client.is_model_ready("resnet10", model_version="1")


def test_version_ready_at_a_variant_is_whether_it_is_resident(client, server):
    client.infer("bert-tiny", _inputs(_text(1)), model_version="1")
    resident = httpx.get(f"{server}/v2/memadapt/budget").json()["resident"]["bert-tiny"]
    assert client.is_model_ready("bert-tiny", model_version=resident)
    others = [v for v in client.get_model_metadata("bert-tiny")["versions"] if v != resident]
    assert others and not client.is_model_ready("bert-tiny", model_version=others[0])


def test_unknown_version_is_404_naming_the_versions(client, server):
    for call in (lambda: client.infer("resnet10", _inputs({"input": _image(1)}),
                                      model_version="2"),
                 lambda: client.get_model_metadata("resnet10", model_version="2")):
        with pytest.raises(InferenceServerException) as e:
            call()
        assert _status(e) == 404
        assert "no version '2'" in e.value.message() and "resnet10+int8" in e.value.message()
    assert not client.is_model_ready("resnet10", model_version="2")
    r = httpx.get(f"{server}/v2/models/resnet10/versions/bert-tiny/ready")
    assert r.status_code == 404 and "'1'" in r.json()["error"]
    with pytest.raises(InferenceServerException) as e:
        client.infer("nosuch", _inputs({"input": _image(1)}), model_version="1")
    assert _status(e) == 404 and "unknown model 'nosuch'" in e.value.message()


def test_repository_unload_then_load(client):
    index = {r["name"]: r for r in client.get_model_repository_index()}
    assert set(index) == {"resnet10", "bert-tiny"}
    assert {r["state"] for r in index.values()} == {"READY"}
    client.unload_model("bert-tiny")
    assert not client.is_model_ready("bert-tiny")
    index = {r["name"]: r for r in client.get_model_repository_index()}
    assert index["bert-tiny"]["version"] == ""  # its memory is free: not resident
    with pytest.raises(InferenceServerException) as e:
        client.infer("bert-tiny", _inputs(_text()))
    assert _status(e) == 503 and "unloaded" in e.value.message()
    index = {r["name"]: r for r in client.get_model_repository_index()}
    assert index["bert-tiny"]["state"] == "UNAVAILABLE"
    client.load_model("bert-tiny")
    assert client.is_model_ready("bert-tiny")
    index = {r["name"]: r for r in client.get_model_repository_index()}
    assert index["bert-tiny"]["state"] == "READY"
    assert index["bert-tiny"]["version"].startswith("bert-tiny")  # resident now
    assert client.infer("bert-tiny", _inputs(_text())).as_numpy("last_hidden_state") is not None


def test_bad_bodies(server):
    url = f"{server}/v2/models/resnet10/infer"
    r = httpx.post(url, content=b"{nope")
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    r = httpx.post(url, content=b"[" + b"0," * 2_000_000 + b"0]")
    assert r.status_code == 413 and "limit" in r.json()["error"]
    doc = {"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                       "parameters": {"binary_data_size": 12288}}]}
    head = json.dumps(doc).encode()
    r = httpx.post(url, content=head + b"\0" * 100,
                   headers={"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 400 and "input 'input'" in r.json()["error"]
    r = httpx.post(url, json={"inputs": [{"name": "input", "shape": [1, 3, 32, 32],
                                          "datatype": "FP32", "data": [1.0, 2.0]}]})
    assert r.status_code == 400 and "input 'input'" in r.json()["error"]
    r = httpx.put(f"{server}/v2/memadapt/budget", json={"budget": "12 parsecs"})
    assert r.status_code == 400 and "unit" in r.json()["error"]
    r = httpx.get(f"{server}/v2/nothing/here")
    assert r.status_code == 404 and "error" in r.json()


def _metrics(server) -> dict[str, list]:
    text = httpx.get(f"{server}/metrics").text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _total(samples, **labels) -> float:
    return sum(s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items())
               and not s.name.endswith("_created"))


def test_infeasible_budget_is_503_then_serves_again(client, server):
    r = httpx.put(f"{server}/v2/memadapt/budget", json={"budget": 50 * MB}, timeout=60)
    assert r.status_code == 200 and r.json()["budget_bytes"] == 50 * MB
    assert r.json()["resident_bytes"] <= 50 * MB
    with pytest.raises(InferenceServerException) as e:
        client.infer("resnet10", _inputs({"input": _image(1)}))
    assert _status(e) == 503 and "resnet10+int8" in e.value.message()
    assert not client.is_model_ready("resnet10")
    with pytest.raises(InferenceServerException) as e:  # nor can the repository load it
        client.load_model("resnet10")
    assert _status(e) == 503 and "resnet10+int8" in e.value.message()
    client.unload_model("resnet10")  # a load that fails leaves an unloaded model unloaded
    with pytest.raises(InferenceServerException) as e:
        client.load_model("resnet10")
    assert _status(e) == 503
    r = httpx.put(f"{server}/v2/memadapt/budget", json={"budget": "1GB"}, timeout=60)
    assert r.status_code == 200
    with pytest.raises(InferenceServerException) as e:
        client.infer("resnet10", _inputs({"input": _image(1)}))
    assert _status(e) == 503 and "unloaded" in e.value.message()
    client.load_model("resnet10")
    assert client.infer("resnet10", _inputs({"input": _image(1)})).as_numpy("logits").shape == \
        (1, 10)
    m = _metrics(server)
    assert _total(m["memadapt_http_errors"], status="503") >= 1
    assert _total(m["memadapt_slo_attainment"], model="resnet10") < 1.0  # the 503 missed it


def test_budget_moves_during_traffic_downgrades_without_failures(server):
    statuses, variants_seen = [], []
    stop = threading.Event()
    before = _metrics(server)

    def run(model, arrays):
        c = tritonhttp.InferenceServerClient(server.removeprefix("http://"),
                                             network_timeout=120)
        while not stop.is_set():
            try:
                r = c.infer(model, _inputs(arrays))
                statuses.append(200)
                variants_seen.append(r.get_response()["parameters"]["memadapt_variant"])
            except InferenceServerException as e:
                statuses.append(int(e.status() or 0))
        c.close()

    threads = [threading.Thread(target=run, args=a) for a in
               [("resnet10", {"input": _image(1)}), ("resnet10", {"input": _image(2)}),
                ("bert-tiny", _text(1)), ("bert-tiny", _text(2))]]
    for t in threads:
        t.start()
    time.sleep(1.0)
    r = httpx.put(f"{server}/v2/memadapt/budget", json={"budget": "200MB"}, timeout=60)
    assert r.status_code == 200 and r.json()["resident_bytes"] <= 200 * MB
    time.sleep(1.0)
    plan = httpx.get(f"{server}/v2/memadapt/plan").json()
    assert plan["budget_bytes"] == 200 * MB and plan["planned_bytes"] <= 200 * MB
    httpx.put(f"{server}/v2/memadapt/budget", json={"budget": "100MB"}, timeout=60)
    time.sleep(1.0)
    httpx.put(f"{server}/v2/memadapt/budget", json={"budget": "1GB"}, timeout=60)
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    assert statuses and set(statuses) <= {200, 503}, set(statuses)
    assert statuses.count(200) > 10
    # downgraded under 200MB (to fp16 or int8: which one depends on the request rates)
    seen = (Counter(variants_seen), Counter(statuses))
    assert set(variants_seen) - {"resnet10", "bert-tiny"}, seen
    after = _metrics(server)
    assert _total(after["memadapt_swaps"]) > _total(before["memadapt_swaps"])
    assert _total(after["memadapt_request_latency_seconds"], model="resnet10") > 0
    assert httpx.get(f"{server}/v2/memadapt/budget").json()["budget_bytes"] == 1000 * MB
    for name in ("memadapt_resident_bytes", "memadapt_budget_bytes", "memadapt_hits",
                 "memadapt_misses", "memadapt_served_accuracy", "memadapt_model_resident_bytes",
                 "memadapt_stall_seconds"):
        assert name in after, name


def test_serve_command_refuses_bad_flag_combinations(tiny_store):
    from click.testing import CliRunner

    import cli

    r = CliRunner().invoke(cli.main, ["serve", str(tiny_store.root), "--replicas", "3"])
    assert r.exit_code == 2 and "--ray" in r.output
    r = CliRunner().invoke(cli.main, ["serve", str(tiny_store.root), "--port", "70000"])
    assert r.exit_code == 2


def test_serve_config_spreads_a_bare_value_over_every_model():
    from adaptive.errors import AdaptiveError
    from adaptive.serve import ServeConfig
    from adaptive.serve.server import per_model

    assert per_model({"*": 0.9, "b": 0.5}, ["a", "b"]) == {"a": 0.9, "b": 0.5}
    assert per_model({"a": 0.1}, ["a", "b"]) == {"a": 0.1}
    with pytest.raises(AdaptiveError, match="SLO"):
        ServeConfig("store", slos={"a": 0})


def test_aliases_serve_a_stored_model_under_more_names(tiny_store, tmp_path):
    from adaptive.serve import ServeConfig, ServerThread, build_cache, create_app

    profiles = tiny_profiles(tmp_path / "profiles.json")
    cache = build_cache(ServeConfig(str(tiny_store.root), profiles=str(profiles), budget="1GB",
                                    threads=1, rebalance_s=None,
                                    aliases={"tenant-a": "resnet10", "tenant-b": "resnet10"},
                                    floors={"tenant-b": 0.935})).start()
    try:
        with ServerThread(create_app(cache)) as url:
            c = tritonhttp.InferenceServerClient(url.removeprefix("http://"),
                                                 network_timeout=60)
            index = {r["name"] for r in c.get_model_repository_index()}
            assert index == {"resnet10", "tenant-a", "tenant-b", "bert-tiny"}
            assert c.get_model_metadata("tenant-a")["versions"] == \
                c.get_model_metadata("resnet10")["versions"]
            x = _image(1)
            res = c.infer("tenant-a", _inputs({"input": x}))
            variant = res.get_response()["model_version"]
            assert variant.startswith("resnet10")
            want = variants.open_session(tiny_store, variant, threads=1).run({"input": x})
            np.testing.assert_allclose(res.as_numpy("logits"), want, atol=1e-4)
            resident = httpx.get(f"{url}/v2/memadapt/budget").json()["resident"]
            assert "tenant-a" in resident and "resnet10" not in resident  # its own session
            floors = {r["model"]: r["floor"] for r in
                      httpx.get(f"{url}/v2/memadapt/plan").json()["models"]}
            # the profiles' floor of the stored model, unless the alias has its own
            assert floors["tenant-a"] == floors["resnet10"] == 0.9
            assert floors["tenant-b"] == 0.935
            c.close()
    finally:
        cache.close()


def test_serve_config_refuses_bad_aliases(tiny_store, tmp_path):
    from adaptive.serve import AliasError, ServeConfig, build_cache

    for bad in ({"": "resnet10"}, {"resnet10": "resnet10"}, {"*": "resnet10"},
                {"a/b": "resnet10"}, {"a": 3}):
        with pytest.raises(AliasError):
            ServeConfig("store", aliases=bad)
    profiles = str(tiny_profiles(tmp_path / "profiles.json"))
    with pytest.raises(AliasError, match="'zzz'.*known: bert-tiny, resnet10"):
        build_cache(ServeConfig(str(tiny_store.root), profiles=profiles, budget="1GB",
                                aliases={"a": "zzz"}))
    with pytest.raises(AliasError, match="already a stored model"):
        build_cache(ServeConfig(str(tiny_store.root), profiles=profiles, budget="1GB",
                                aliases={"bert-tiny": "resnet10"}))


@pytest.mark.parametrize("flags,needle", [
    (["--alias", "tenant-a"], "expected NAME=STORED_MODEL"),
    (["--alias", "=resnet10"], "expected NAME=STORED_MODEL"),
    (["--alias", "a=resnet10", "--alias", "a=bert-tiny"], "'a' is given twice"),
    (["--alias", "a=zzz"], "'zzz', which is not a served model"),
    (["--alias", "bert-tiny=resnet10"], "already a stored model"),
])
def test_serve_command_refuses_bad_aliases_with_exit_2(tiny_store, tmp_path, flags, needle):
    from click.testing import CliRunner

    import cli

    profiles = str(tiny_profiles(tmp_path / "profiles.json"))
    r = CliRunner().invoke(cli.main, ["serve", str(tiny_store.root), "--profiles", profiles,
                                      "--budget", "1GB", "--port", "0", *flags])
    assert r.exit_code == 2, r.output
    assert "--alias" in r.output and needle in " ".join(r.output.split())


def test_budget_and_plan_show_the_budget_the_policy_plans_with(tiny_store):
    # resnet10's load peaks 100 MB above its steady size: the cache keeps that back from
    # the policy, and the plan the server shows must fit what the policy has, not the budget
    from adaptive.cache import VariantCache
    from adaptive.serve import ServerThread, create_app

    cands = {"resnet10": [Candidate("resnet10", 300 * MB, 0.95, load_peak_bytes=400 * MB),
                          Candidate("resnet10+int8", 80 * MB, 0.93)],
             "bert-tiny": [Candidate("bert-tiny", 200 * MB, 1.0),
                           Candidate("bert-tiny+int8", 60 * MB, 0.98)]}
    cache = VariantCache(tiny_store, budget=1000 * MB, candidates=cands, threads=1).start()
    try:
        with ServerThread(create_app(cache)) as url:
            b = httpx.get(f"{url}/v2/memadapt/budget").json()
            assert b["budget_bytes"] == 1000 * MB and b["plan_budget_bytes"] == 900 * MB
            r = httpx.put(f"{url}/v2/memadapt/budget", json={"budget": 250 * MB}, timeout=60)
            assert r.json()["plan_budget_bytes"] == 150 * MB
            plan = httpx.get(f"{url}/v2/memadapt/plan").json()
            assert plan["budget_bytes"] == 250 * MB and plan["plan_budget_bytes"] == 150 * MB
            # 250 MB would plan bert-tiny at full size; 150 MB holds only the int8 pair
            assert plan["planned_bytes"] == 140 * MB
            assert {m["model"]: m["planned"] for m in plan["models"]} == {
                "resnet10": "resnet10+int8", "bert-tiny": "bert-tiny+int8"}
    finally:
        cache.close()
