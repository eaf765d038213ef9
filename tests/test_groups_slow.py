"""Issue 17's acceptance for groups: digits-trained resnet10, resnet18 and resnet34 with
their int8 variants, generated, grouped, profiled and selected through the CLI under a
budget that fits only the small members; simulate and the cache serve the group's name.

Prints its figures (``pytest -m slow tests/test_groups_slow.py -s``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

# imported before any int8 quantization: onnxruntime.transformers appends its folder (which
# has a profiler.py) to sys.path, and under an editable install that one would shadow ours
import profiler
from adaptive import VariantCache
from cli import main
from profiler.report import group_rows

#: epochs on digits: resnet10 short of the floor, the larger bases above it
EPOCHS = {"resnet10": 1, "resnet18": 3, "resnet34": 3}
BASES = tuple(EPOCHS)
MEMBERS = [f"{b}{s}" for b in BASES for s in ("", "+int8")]
FLOOR = 0.9
BATCH = 1  # on CPU int8 is smaller than fp32 at batch 1 (not at 8: its fp32 activations)


def invoke(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, f"memadapt {' '.join(map(str, args))}: {r.output}"
    return r.output


@pytest.mark.slow
def test_a_group_of_resnets_serves_the_most_accurate_member_that_fits(tmp_path):
    store = tmp_path / "store"
    for b, epochs in EPOCHS.items():
        w = tmp_path / f"{b}.safetensors"
        invoke("train", b, "--epochs", epochs, "--out", w)
        invoke("generate", b, "--num-classes", "10", "--weights", w, "--quantize", "int8",
               "--out", store)
    out = invoke("group", "digits", *MEMBERS, "--out", store)
    assert "digits" in out
    invoke("profile", store, "--batch", "1,8", "--runs", "5")
    rows = [r for r in json.loads(invoke("show", store, "--json")) if r["batch"] == BATCH]
    mem = {r["name"]: r["peak_memory_bytes"] for r in rows}
    acc = {r["name"]: r["accuracy"] for r in rows}
    assert set(mem) == set(MEMBERS) and all(v is not None for v in acc.values())
    print(f"\nmembers (batch {BATCH}): " + ", ".join(
        f"{n} {mem[n] / 2**20:.1f} MiB acc {acc[n]:.3f}" for n in MEMBERS))
    best = max(MEMBERS, key=lambda n: (acc[n], -mem[n]))

    # a budget that fits only the smaller members (about half, and at least one meeting the
    # floor): which ones depends on the measured memory, so it is read from the profile
    order = sorted(MEMBERS, key=lambda n: mem[n])
    k = next(k for k in range(3, len(order)) if any(acc[n] >= FLOOR for n in order[:k]))
    assert mem[order[k - 1]] < mem[order[k]], (mem, acc)
    budget = (mem[order[k - 1]] + mem[order[k]]) // 2
    fits = [n for n in MEMBERS if mem[n] <= budget]
    assert sorted(fits) == sorted(order[:k])
    want = max((n for n in fits if acc[n] >= FLOOR), key=lambda n: (acc[n], -mem[n]))
    plan = json.loads(invoke("select", store, "--budget", budget, "--floor",
                             f"digits={FLOOR}", "--batch", BATCH, "--json"))
    assert set(plan["plan"]) == {"digits"}
    chosen = plan["plan"]["digits"]
    assert chosen in fits and acc[chosen] == acc[want] >= FLOOR
    assert plan["memory_bytes"] <= budget
    roomy = json.loads(invoke("select", store, "--budget", "4GiB", "--floor",
                              f"digits={FLOOR}", "--batch", BATCH, "--json"))
    assert acc[roomy["plan"]["digits"]] == acc[best] >= acc[chosen]

    # tighter: only resnet10's members fit; below the floor the plan is refused, not degraded
    r10 = [n for n in MEMBERS if n.startswith("resnet10")]
    assert max(mem[n] for n in r10) < min(mem[n] for n in MEMBERS if n not in r10)
    tight = (max(mem[n] for n in r10) + min(mem[n] for n in MEMBERS if n not in r10)) // 2
    r = CliRunner().invoke(main, ["select", str(store), "--budget", str(tight), "--floor",
                                  f"digits={FLOOR}", "--batch", str(BATCH), "--json"])
    if max(acc[n] for n in r10) < FLOOR:
        assert r.exit_code == 1 and "digits" in r.output, r.output
        tight_plan = f"refused (exit 1): {r.output.strip()}"
    else:
        assert json.loads(r.output)["plan"]["digits"] in r10
        tight_plan = r.output

    trace = tmp_path / "t.csv"
    rng = np.random.default_rng(0)
    trace.write_text("timestamp_s,model\n" + "".join(
        f"{t:.4f},digits\n" for t in np.cumsum(rng.exponential(0.2, 500))))
    sim = {r["policy"]: r for r in json.loads(invoke(
        "simulate", "--store", store, "--trace", trace, "--budget", budget, "--floor",
        f"digits={FLOOR}", "--batch", BATCH, "--policies", "memadapt,infaas,lru", "--json"))}
    # every request served by a member that fits and keeps the floor (a miss may be served by
    # the fastest-loading one first), none above the plan's
    assert sim["memadapt"]["floor_violations"] == 0
    assert FLOOR <= sim["memadapt"]["mean_accuracy"] <= acc[chosen] + 1e-9

    images = rng.random((BATCH, 3, 224, 224), dtype=np.float32)
    with VariantCache(store, budget=budget, floors={"digits": FLOOR}, max_batch=BATCH) as cache:
        res = [cache.infer("digits", images) for _ in range(3)]
        assert res[0].output.shape == (BATCH, 10)
        assert all(r.variant in fits and acc[r.variant] >= FLOOR for r in res)
        stats = cache.stats()
        assert stats.bytes_resident <= budget and stats.models["digits"].requests == 3

    gp = {r["member"]: r for r in _group_rows(store)}
    print("fidelity to the group's most accurate member: " + ", ".join(
        f"{n} {gp[n]['fidelity_to_reference']:.3f}" for n in MEMBERS))
    print(f"budget {budget / 2**20:.1f} MiB fits {sorted(fits)}; floor {FLOOR}; plan "
          f"{chosen} ({plan['memory_bytes'] / 2**20:.1f} MiB, acc {acc[chosen]:.3f}); "
          f"4 GiB plan {roomy['plan']['digits']}; simulate memadapt miss rate "
          f"{sim['memadapt']['miss_rate']:.4f} accuracy {sim['memadapt']['mean_accuracy']:.3f}; "
          f"cache served {[r.variant for r in res]}")
    print(f"budget {tight / 2**20:.1f} MiB (resnet10's members only), floor {FLOOR}: "
          f"{tight_plan}")


def _group_rows(store):
    return group_rows(profiler.load_group_profiles(store), batch=BATCH)
