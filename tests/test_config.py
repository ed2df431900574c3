import pytest

from calm.config import CalmUsageError, CandidateSpec, QuantSpec, RunConfig, SearchConfig, parse_pool


@pytest.mark.parametrize("scheme,expect", [
    ("W4A16G128", QuantSpec(4, 128)), ("W3A16G64", QuantSpec(3, 64)), ("W2A16G64", QuantSpec(2, 64)),
    ("w3a16", QuantSpec(3, 0)), ("W4A8", QuantSpec(4, 0, a_bits=8)), ("W3A3K2V2", QuantSpec(3, 0, a_bits=3,
                                                                                         k_bits=2, v_bits=2)),
])
def test_scheme_parsing_round_trips(scheme, expect):
    spec = QuantSpec.from_scheme(scheme)
    assert spec == expect
    assert QuantSpec.from_scheme(spec.scheme) == spec


@pytest.mark.parametrize("bad,match", [("W5A16", "weight bits must be"), ("int4", "unknown scheme 'int4'"),
                                       ("W3G", "unknown scheme 'W3G'"), ("W3A5", "a_bits must be"),
                                       ("", "unknown scheme ''")])
def test_bad_scheme_is_refused(bad, match):
    with pytest.raises(CalmUsageError, match=match):
        QuantSpec.from_scheme(bad)


def test_group_must_divide_input_size():
    spec = QuantSpec.from_scheme("W4A16G128")
    with pytest.raises(CalmUsageError, match="does not divide.*576"):
        spec.group_for(576)
    assert QuantSpec.from_scheme("W4A16G64").group_for(576) == 64
    assert QuantSpec.from_scheme("W4A16").group_for(576) == 576


def test_pool_parsing_and_options():
    pool = parse_pool("rtn;gptq:act_order=static,damp=0.02")
    assert [c.algorithm for c in pool] == ["rtn", "gptq"]
    assert pool[1].options == {"act_order": "static", "damp": 0.02}
    assert pool[1].name == "gptq[act_order=static,damp=0.02]"
    with pytest.raises(CalmUsageError, match="names a candidate twice"):
        parse_pool("rtn,rtn")
    with pytest.raises(CalmUsageError, match="must read key=value"):
        CandidateSpec.parse("gptq:act_order")
    # without ';', options after a ':' stay with their candidate
    single = parse_pool("kurtosis:steps=5,lr=0.01")
    assert len(single) == 1 and single[0].options == {"steps": 5, "lr": 0.01}
    assert [c.name for c in parse_pool("rtn,gptq:damp=0.02,act_order=none,rotation")] == [
        "rtn", "gptq[act_order=none,damp=0.02]", "rotation"]


def test_candidates_name_their_own_bits_and_group_size():
    pool = parse_pool("gptq@3g192;gptq@g32;rtn@4g0;awq@2:n_grid=10")
    assert [(c.bits, c.group_size) for c in pool] == [(3, 192), (None, 32), (4, 0), (2, None)]
    assert [c.name for c in pool] == ["gptq@3g192", "gptq@g32", "rtn@4g0", "awq@2[n_grid=10]"]
    spec = QuantSpec.from_scheme("W3A16G64")
    assert [c.spec_for(spec) for c in pool] == [QuantSpec(3, 192), QuantSpec(3, 32), QuantSpec(4, 0), QuantSpec(2, 64)]
    assert parse_pool("gptq@3g64")[0].name != parse_pool("gptq@3")[0].name  # named as written, never merged
    cfg = RunConfig(scheme="W3A16G64", search=SearchConfig(pool=pool))
    assert RunConfig.from_json(cfg.to_json()) == cfg
    for bad in ("gptq@3g", "gptq@g", "gptq@", "gptq@3x64", "gptq@5g64"):
        with pytest.raises(CalmUsageError, match="after '@'"):
            CandidateSpec.parse(bad)


def test_a_group_size_is_refused_for_an_algorithm_without_groups():
    from calm.algorithms import validate_candidate

    with pytest.raises(CalmUsageError, match="claq has no weight groups; drop the 'g64' .e.g. claq@3"):
        validate_candidate(CandidateSpec.parse("claq@3g64"), QuantSpec.from_scheme("W3A16G64"))
    validate_candidate(CandidateSpec.parse("gptq@3g192"), QuantSpec.from_scheme("W3A16G64"))


def test_run_config_json_round_trip():
    cfg = RunConfig(scheme="W2A16G64", search=SearchConfig(pool=parse_pool("rtn;gptq:act_order=full"),
                                                         propagation="independent"))
    assert RunConfig.from_json(cfg.to_json()) == cfg
