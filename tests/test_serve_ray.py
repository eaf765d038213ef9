"""`memadapt serve --ray --replicas 2`: the same tritonclient calls through Ray Serve.

The tests that start a local Ray instance (several processes) are marked slow; the routing
helpers are tested in the default run.
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("ray.serve")
tritonhttp = pytest.importorskip("tritonclient.http")
from test_server import (  # noqa: E402
    ROOT,
    _free_port,
    _image,
    _inputs,
    _text,
    tiny_profiles,
    wait_ready,
)
from tritonclient.utils import InferenceServerException  # noqa: E402

import variants  # noqa: E402
from adaptive.serve.scaleout import REPLICA_HEADER, model_of  # noqa: E402


def test_model_of_reads_the_header_then_the_path():
    assert model_of("/v2/models/resnet10/infer", {}) == "resnet10"
    assert model_of("/v2/repository/models/bert-tiny/load", {}) == "bert-tiny"
    assert model_of("/v2/models/a%2Fb/ready", {}) == "a/b"
    assert model_of("/v2/health/ready", {}) == ""
    assert model_of("/v2/health/ready", {"serve_multiplexed_model_id": "m"}) == "m"


@pytest.fixture(scope="module")
def ray_server(tiny_store, tmp_path_factory):
    profiles = tiny_profiles(tmp_path_factory.mktemp("ray") / "profiles.json")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", str(tiny_store.root), "--profiles",
         str(profiles), "--budget", "1GB", "--port", str(port), "--threads", "1", "--ray",
         "--replicas", "2"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    wait_ready(proc, base, 240)
    yield base
    proc.send_signal(2)  # SIGINT: the command shuts the Serve application and Ray down
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.mark.slow
def test_same_client_calls_through_two_replicas(ray_server, tiny_store):
    c = tritonhttp.InferenceServerClient(ray_server.removeprefix("http://"),
                                         network_timeout=120)
    assert c.is_server_ready()
    assert c.get_model_metadata("resnet10")["versions"][0] == "resnet10"
    for model, arrays, output in (("resnet10", {"input": _image()}, "logits"),
                                  ("bert-tiny", _text(), "last_hidden_state")):
        for headers in (None, {"serve_multiplexed_model_id": model}):
            res = c.infer(model, _inputs(arrays), headers=headers)
            variant = res.get_response()["parameters"]["memadapt_variant"]
            want = variants.open_session(tiny_store, variant, threads=1).run(arrays)
            np.testing.assert_allclose(res.as_numpy(output), want, atol=1e-4)
    with pytest.raises(InferenceServerException) as e:
        c.infer("nosuch", _inputs({"input": _image(1)}))
    assert e.value.status() == "404"
    with pytest.raises(InferenceServerException) as e:
        c.infer("resnet10", _inputs({"input": np.zeros((1, 3, 32), np.float32)}))
    assert e.value.status() == "400" and "input 'input'" in e.value.message()
    # a model's requests stay on the replica that serves it (once Serve has heard of it)
    time.sleep(2)
    colds = [c.infer("bert-tiny", _inputs(_text(1))).get_response()["parameters"]
             ["memadapt_cold"] for _ in range(5)]
    assert sum(colds) == 0  # already loaded by the calls above, on the replica they reached
    c.close()


@pytest.mark.slow
def test_every_answer_names_its_replica(ray_server):
    # requests without a model reach either replica; each answer carries that replica's pid,
    # so the benchmark can tell the two budgets (and processes) apart from outside
    import httpx

    pids = set()
    for _ in range(40):
        r = httpx.get(ray_server + "/v2/memadapt/budget", timeout=30)
        assert r.status_code == 200 and r.json()["budget_bytes"] > 0
        pids.add(int(r.headers[REPLICA_HEADER]))
    assert len(pids) == 2
