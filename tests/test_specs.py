import json

import pytest

from variants import (
    EarlyExit,
    Prune,
    Quantize,
    SpecError,
    parse_spec,
    parse_variant_name,
    plan_chains,
    spec_from_dict,
    validate_chain,
    variant_name,
)


@pytest.mark.parametrize("spec", [Prune(0.5), Prune(0.3), EarlyExit(2), Quantize("int8"),
                                  Quantize("fp16")])
def test_spec_json_round_trip(spec):
    assert spec_from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert parse_spec(spec.tag) == spec
    assert hash(spec) == hash(spec_from_dict(spec.to_dict()))


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, float("nan"), "0.5", True])
def test_prune_ratio_validated(bad):
    with pytest.raises(SpecError, match=r"\(0, 1\)"):
        Prune(bad)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_exit_point_validated(bad):
    with pytest.raises(SpecError, match=">= 1"):
        EarlyExit(bad)


def test_quantize_mode_lists_allowed():
    with pytest.raises(SpecError, match="int8, fp16"):
        Quantize("int4")


def test_unknown_kind_is_refused():
    with pytest.raises(SpecError, match="known: exit, prune, quantize"):
        spec_from_dict({"kind": "distill", "steps": 3})
    with pytest.raises(SpecError, match="newer"):
        spec_from_dict({"kind": "prune", "ratio": 0.5, "version": 99})


def test_canonical_name_and_parse():
    chain = (Prune(0.5), EarlyExit(2), Quantize("int8"))
    assert variant_name("resnet18", chain) == "resnet18+prune0.5+exit2+int8"
    assert parse_variant_name("resnet18+prune0.5+exit2+int8") == ("resnet18", chain)
    assert variant_name("resnet18", ()) == "resnet18"


@pytest.mark.parametrize("chain,why", [
    ((Quantize("int8"), Prune(0.5)), "out of order"),
    ((EarlyExit(2), Prune(0.5)), "out of order"),
    ((Quantize("int8"), Quantize("fp16")), "only once"),
    ((Prune(0.3), Prune(0.5)), "only once"),
])
def test_nonsense_chains_refused_with_reason(chain, why):
    with pytest.raises(SpecError, match=why):
        validate_chain(chain)


def test_plan_chains_alone_and_combined():
    alone = plan_chains([0.5], [2], ["int8"])
    assert alone == [(), (Prune(0.5),), (EarlyExit(2),), (Quantize("int8"),)]
    combined = plan_chains([0.5], [2], ["int8"], combine=True)
    assert len(combined) == 8  # 2 x 2 x 2 including the base
    assert (Prune(0.5), EarlyExit(2), Quantize("int8")) in combined
    assert len(set(combined)) == len(combined)
