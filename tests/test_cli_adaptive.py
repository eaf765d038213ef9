"""select / trace / simulate through the CLI, on a profiles file (no models needed)."""

import json

import pytest
from click.testing import CliRunner

from adaptive import Candidate, ModelDemand
from adaptive.catalog import demands_from_json, demands_to_json
from cli import main

MB = 1_000_000


@pytest.fixture()
def profiles(tmp_path):
    ds = [
        ModelDemand("resnet18", [Candidate("resnet18", 200 * MB, 0.95, 0.02, 0.07),
                                 Candidate("resnet18+int8", 60 * MB, 0.94, 0.01, 0.04),
                                 Candidate("resnet18+exit2", 30 * MB, 0.70, 0.005, 0.02)],
                    floor=0.9),
        ModelDemand("minilm", [Candidate("minilm", 150 * MB, 1.0, 0.01, 0.2),
                               Candidate("minilm+int8", 50 * MB, 0.97, 0.005, 0.1)]),
    ]
    p = tmp_path / "profiles.json"
    p.write_text(json.dumps(demands_to_json(ds)))
    assert demands_from_json(p) == ds
    return p


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_select_json_plan(profiles):
    r = invoke("select", "--profiles", profiles, "--budget", "300MB", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["budget_bytes"] == 300 * MB
    # 0.94 + 1.0 beats 0.95 + 0.97: the optimum downgrades resnet18, not minilm
    assert out["plan"] == {"resnet18": "resnet18+int8", "minilm": "minilm"}
    assert out["memory_bytes"] == 210 * MB <= out["budget_bytes"]
    # a tighter budget downgrades, never below the floor (exit2 is under 0.9)
    out = json.loads(invoke("select", "--profiles", profiles, "--budget", "110MiB",
                            "--json").output)
    assert out["plan"]["resnet18"] == "resnet18+int8"


def test_select_infeasible_floor_exits_1(profiles):
    r = invoke("select", "--profiles", profiles, "--budget", "40MB", "--floor", "resnet18=0.9")
    assert r.exit_code == 1
    assert "resnet18" in r.output and "resnet18+int8" in r.output and "budget" in r.output


@pytest.mark.parametrize("args,needle", [
    (("--budget", "12 parsecs"), "unit"),
    (("--budget", "1GB", "--floor", "nosuch=0.5"), "nosuch"),
    (("--budget", "1GB", "--rate", "minilm=fast"), "MODEL=RATE"),
])
def test_select_bad_input_exits_2(profiles, args, needle):
    r = invoke("select", "--profiles", profiles, *args)
    assert r.exit_code == 2, r.output
    assert needle in r.output


def test_trace_synth_and_simulate(profiles, tmp_path):
    trace = tmp_path / "t.csv"
    r = invoke("trace", "synth", "--models", "12", "--requests", "5000", "--kind", "zipf",
               "--seed", "3", "--out", trace)
    assert r.exit_code == 0, r.output
    assert trace.read_text().splitlines()[0].startswith("timestamp_s,model")
    png = tmp_path / "sim.png"
    r = invoke("simulate", "--profiles", profiles, "--trace", trace, "--budget", "400MB",
               "--policies", "lru,infaas,memadapt", "--json", "--plot", png)
    assert r.exit_code == 0, r.output
    rows = {x["policy"]: x for x in json.loads(r.output)}
    assert set(rows) == {"lru", "infaas", "memadapt"}
    for x in rows.values():
        for k in ("miss_rate", "mean_latency_s", "p99_latency_s", "mean_accuracy",
                  "floor_violations"):
            assert k in x
        assert x["floor_violations"] == 0
    assert rows["memadapt"]["miss_rate"] <= rows["lru"]["miss_rate"]
    assert png.stat().st_size > 10_000


def test_simulate_errors_name_the_line(profiles, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("timestamp_s,model\n0.0,a\n2.0,b\n1.0,a\n")
    r = invoke("simulate", "--profiles", profiles, "--trace", bad, "--budget", "1GB")
    assert r.exit_code == 1 and ":4" in r.output
    r = invoke("simulate", "--profiles", profiles, "--trace", bad)
    assert r.exit_code == 2 and "--budget" in r.output
