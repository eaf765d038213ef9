"""select / trace / simulate through the CLI, on a profiles file (no models needed)."""

import json
import re

import pytest
from click.testing import CliRunner

from adaptive import Candidate, ModelDemand
from adaptive.catalog import demands_from_json, demands_to_json
from cli import main

MB = 1_000_000


@pytest.fixture()
def profiles(tmp_path):
    ds = [
        ModelDemand("resnet18", [Candidate("resnet18", 200 * MB, 0.95, 0.02, 0.07,
                                           load_peak_bytes=260 * MB),
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
    assert set(rows) == {"lru", "infaas", "memadapt", "bound"}
    bound = rows.pop("bound")
    for x in rows.values():
        for k in ("miss_rate", "stall_rate", "slo_attainment", "goodput", "effective_accuracy",
                  "normalized_accuracy", "bytes_loaded", "mean_latency_s", "p99_latency_s",
                  "mean_accuracy", "floor_violations"):
            assert x[k] is not None, k
        assert x["floor_violations"] == 0
        assert bound["miss_rate"] <= x["miss_rate"]
    assert rows["memadapt"]["miss_rate"] <= rows["lru"]["miss_rate"]
    assert bound["effective_accuracy"] is None
    assert png.stat().st_size > 10_000


def test_simulate_errors_name_the_line(profiles, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("timestamp_s,model\n0.0,a\n2.0,b\n1.0,a\n")
    r = invoke("simulate", "--profiles", profiles, "--trace", bad, "--budget", "1GB")
    assert r.exit_code == 2 and ":4" in r.output  # bad input: exit 2, naming the line
    r = invoke("simulate", "--profiles", profiles, "--trace", bad)
    assert r.exit_code == 2 and "--budget" in r.output


def test_simulate_with_slos_reports_the_field_metrics_and_a_verdict(profiles, tmp_path):
    trace = tmp_path / "t.csv"
    invoke("trace", "synth", "--models", "8", "--requests", "3000", "--kind", "azure",
           "--seed", "2", "--out", trace)
    r = invoke("simulate", "--profiles", profiles, "--trace", trace, "--budget", "300MB",
               "--slo", "0.25", "--slo", "minilm=0.15")
    assert r.exit_code == 0, r.output
    for col in ("stall", "SLO att.", "eff. acc.", "norm. acc.", "bound", "belady", "infaas"):
        assert col in r.output
    assert "memadapt beats" in r.output or "memadapt falls short" in r.output
    assert "lost to late requests / to smaller variants" in r.output and "infaas 0." in r.output
    line = next(x for x in r.output.splitlines() if x.startswith("bound on misses"))
    r = invoke("simulate", "--profiles", profiles, "--trace", trace, "--budget", "300MB",
               "--slo", "minilm=0.15", "--json")
    rows = {x["policy"]: x for x in json.loads(r.output)}
    # the bound line: its rate and every policy's multiple of it (none below 1)
    assert f"bound on misses {rows['bound']['miss_rate']:.4f}" in line
    mult = {p: float(x) for p, x in re.findall(r"([\w-]+) ([\d.]+)x", line)}
    assert set(mult) == set(rows) - {"bound"} and min(mult.values()) >= 1.0
    assert mult["memadapt"] == pytest.approx(
        rows["memadapt"]["miss_rate"] / rows["bound"]["miss_rate"], abs=0.006)
    assert 0 < rows["memadapt"]["slo_attainment"] <= 1
    for x in rows.values():  # where effective accuracy goes adds up (bound: null)
        if x["policy"] != "bound":
            assert x["best_accuracy"] - x["accuracy_lost_late"] - x["accuracy_lost_rungs"] \
                == pytest.approx(x["effective_accuracy"], abs=1e-9)


@pytest.mark.parametrize("args,needle", [
    (("--floor", "1.5"), "outside [0, 1]"),
    (("--floor", "nosuch=0.5"), "nosuch"),
    (("--slo", "minilm=0"), "> 0 seconds"),
    (("--slo", "nosuch=0.1"), "nosuch"),
    (("--slo", "minilm=soon"), "MODEL=SECONDS"),
])
def test_simulate_bad_floors_and_slos_exit_2(profiles, tmp_path, args, needle):
    trace = tmp_path / "t.csv"
    trace.write_text("timestamp_s,model\n0.0,a\n")
    r = invoke("simulate", "--profiles", profiles, "--trace", trace, "--budget", "1GB", *args)
    assert r.exit_code == 2, r.output
    assert needle in r.output


def test_profiles_without_slo_still_load(tmp_path):
    p = tmp_path / "old.json"
    p.write_text(json.dumps({"families": [{"model": "m", "floor": 0.5, "candidates": [
        {"variant": "m", "memory_bytes": 10, "accuracy": 0.9}]}]}))
    (d,) = demands_from_json(p)
    assert d.slo_s is None and d.candidates[0].latency_s == 0.0
