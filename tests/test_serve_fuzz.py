"""Schemathesis over the server's own OpenAPI schema, against the live server on loopback.

No response may be a 5xx other than the documented 503 (a model that cannot be served now),
responses must match the schema, and the server must still serve afterwards.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest

schemathesis = pytest.importorskip("schemathesis")
tritonhttp = pytest.importorskip("tritonclient.http")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
)
from test_server import tiny_profiles  # noqa: E402

from adaptive.serve import ServeConfig, ServerThread, build_cache, create_app  # noqa: E402


@pytest.fixture(scope="module")
def live(tiny_store, tmp_path_factory):
    profiles = tiny_profiles(tmp_path_factory.mktemp("fuzz") / "profiles.json")
    cache = build_cache(ServeConfig(str(tiny_store.root), profiles=str(profiles), budget="1GB",
                                    threads=1, rebalance_s=None)).start()
    app = create_app(cache, max_request_bytes=1_000_000, slos={"resnet10": 0.5})
    try:
        with ServerThread(app) as url:
            yield url
    finally:
        cache.close()


def no_undocumented_server_error(ctx, response, case):
    """5xx only where the operation documents it (503)."""
    status = response.status_code
    documented = case.operation.definition.raw.get("responses", {})
    if status >= 500 and str(status) not in documented:
        raise AssertionError(f"{case.operation.label} answered {status}: {response.text[:500]}")


CHECKS = [no_undocumented_server_error, content_type_conformance, response_schema_conformance]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzz_the_openapi_schema(live, mode):
    # schemathesis' own pytest loader does not run under pytest 9; drive its strategies here
    schema = schemathesis.openapi.from_url(f"{live}/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 16
    labels = {op.label for op in operations}
    assert {f"{m} /v2/models/{{model}}/versions/{{version}}{tail}" for m, tail in
            (("GET", ""), ("GET", "/ready"), ("POST", "/infer"))} <= labels, labels
    statuses: list[int] = []
    for op in operations:
        @given(case=op.as_strategy(mode))
        @settings(max_examples=12, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            statuses.append(case.call_and_validate(checks=CHECKS).status_code)

        try:
            check()
        except Unsatisfiable:  # nothing to make invalid (no parameters, no body)
            assert mode is GenerationMode.NEGATIVE
    assert len(statuses) > 3 * len(operations)
    assert 400 in statuses and 200 in statuses


def test_still_serves_after_fuzzing(live):
    # the fuzzer may have moved the budget and unloaded models: put them back
    assert httpx.put(f"{live}/v2/memadapt/budget", json={"budget": "1GB"},
                     timeout=60).status_code == 200
    c = tritonhttp.InferenceServerClient(live.removeprefix("http://"), network_timeout=60)
    for m in ("resnet10", "bert-tiny"):
        c.load_model(m)
    assert c.is_server_ready() and c.is_model_ready("resnet10")
    x = np.zeros((1, 3, 32, 32), np.float32)
    i = tritonhttp.InferInput("input", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    assert c.infer("resnet10", [i]).as_numpy("logits").shape == (1, 10)
    c.close()
