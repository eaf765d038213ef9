"""The example server over real HTTP on loopback, as a subprocess."""

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from adaptive import Candidate, ModelDemand
from adaptive.catalog import demands_to_json

ROOT = Path(__file__).resolve().parent.parent
MB = 1_000_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_store, tmp_path_factory):
    # made-up memory charges on the real stored variants, so budgets force swaps
    ds = [ModelDemand("resnet10", [Candidate("resnet10", 300 * MB, 0.95),
                                   Candidate("resnet10+fp16", 150 * MB, 0.94),
                                   Candidate("resnet10+int8", 80 * MB, 0.93)], floor=0.9),
          ModelDemand("bert-tiny", [Candidate("bert-tiny", 200 * MB, 1.0),
                                    Candidate("bert-tiny+int8", 60 * MB, 0.98)])]
    profiles = tmp_path_factory.mktemp("srv") / "profiles.json"
    profiles.write_text(json.dumps(demands_to_json(ds)))
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "server.py"), "--store", str(tiny_store.root),
         "--profiles", str(profiles), "--budget", "1GB", "--port", str(port),
         "--max-request-bytes", "2000000", "--threads", "1", "--rebalance-s", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited: {proc.stdout.read()}")
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("server did not start")
    yield base
    proc.terminate()
    proc.wait(timeout=20)


def _img(b=2):
    return np.random.default_rng(0).standard_normal((b, 3, 32, 32)).round(3).tolist()


def _text(b=2, t=6):
    ids = np.random.default_rng(1).integers(1000, 30000, (b, t))
    return {"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist()}


def test_infer_two_models_names_the_variant(server):
    r = httpx.post(f"{server}/v1/models/resnet10/infer", json={"inputs": _img()}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["shape"] == [2, 10] and r.headers["X-Memadapt-Variant"] == body["variant"]
    assert body["variant"].startswith("resnet10")
    r = httpx.post(f"{server}/v1/models/bert-tiny/infer", json={"inputs": _text()}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["shape"] == [2, 6, 128]
    models = {m["model"]: m for m in httpx.get(f"{server}/v1/models").json()["models"]}
    assert models["resnet10"]["floor"] == 0.9 and models["resnet10"]["variant"]


@pytest.mark.parametrize("path,body,status,needle", [
    ("/v1/models/nosuch/infer", {"inputs": [[0]]}, 404, "unknown model"),
    ("/v1/models/resnet10/infer", {"inputs": [[[[0.0]]]]}, 422, "shape"),
    ("/v1/models/resnet10/infer", {"x": 1}, 422, "inputs"),
    ("/v1/models/bert-tiny/infer", {"inputs": [[1, 2]]}, 422, "input_ids"),
    ("/v1/models/resnet10/infer", {"inputs": np.zeros((9, 3, 32, 32)).tolist()}, 422, "batch"),
])
def test_bad_requests_get_4xx_with_a_message(server, path, body, status, needle):
    r = httpx.post(server + path, json=body, timeout=30)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]


def test_bad_json_and_oversized_bodies(server):
    r = httpx.post(f"{server}/v1/models/resnet10/infer", content=b"{nope",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    r = httpx.post(f"{server}/v1/models/resnet10/infer", content=b"[" + b"0," * 2_000_000 + b"0]")
    assert r.status_code == 413
    r = httpx.put(f"{server}/v1/budget", json={"budget": "12 parsecs"})
    assert r.status_code == 422 and "unit" in r.json()["error"]


def test_budget_drop_during_traffic_downgrades_without_5xx(server):
    statuses, variants_seen = [], []
    stop = threading.Event()

    def client(model, inputs):
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                r = c.post(f"{server}/v1/models/{model}/infer", json={"inputs": inputs})
                statuses.append(r.status_code)
                if r.status_code == 200:
                    variants_seen.append(r.headers["X-Memadapt-Variant"])

    threads = [threading.Thread(target=client, args=a) for a in
               [("resnet10", _img(1)), ("resnet10", _img(2)), ("bert-tiny", _text(1)),
                ("bert-tiny", _text(2))]]
    for t in threads:
        t.start()
    time.sleep(1.0)
    before = httpx.get(f"{server}/metrics").text
    r = httpx.put(f"{server}/v1/budget", json={"budget": "200MB"}, timeout=60)
    assert r.status_code == 200 and r.json()["resident_bytes"] <= 200 * MB
    time.sleep(1.0)
    r = httpx.put(f"{server}/v1/budget", json={"budget": "100MB"}, timeout=60)
    time.sleep(1.0)
    httpx.put(f"{server}/v1/budget", json={"budget": "1GB"}, timeout=60)
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    assert statuses and all(s in (200, 503) for s in statuses), set(statuses)
    assert statuses.count(200) > 10
    assert {"resnet10+int8", "bert-tiny+int8"} & set(variants_seen)  # downgraded under 200MB
    metrics = httpx.get(f"{server}/metrics").text
    swaps = sum(float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith("memadapt_swaps_total"))
    swaps_before = sum(float(line.split()[-1]) for line in before.splitlines()
                       if line.startswith("memadapt_swaps_total"))
    assert swaps > swaps_before
    assert "memadapt_resident_bytes" in metrics and "memadapt_served_accuracy" in metrics


def test_infeasible_budget_is_503_with_reason(server):
    r = httpx.put(f"{server}/v1/budget", json={"budget": 50 * MB})
    assert r.status_code == 200
    r = httpx.post(f"{server}/v1/models/resnet10/infer", json={"inputs": _img(1)}, timeout=60)
    assert r.status_code == 503
    assert "resnet10+int8" in r.json()["error"] and "budget" in r.json()["error"]
    httpx.put(f"{server}/v1/budget", json={"budget": "1GB"})
    r = httpx.post(f"{server}/v1/models/resnet10/infer", json={"inputs": _img(1)}, timeout=60)
    assert r.status_code == 200
