"""benchmarks/probe_second_call.py: every launch it times computes the call it claims, on
the data it claims (the two data sets differ), and a case it cannot find is refused."""

import pytest
import torch

from pa_hybrid import reference_paged_attention

from conftest import load_script, skip_if_unsupported

WORKLOAD = {  # one kv head of 16 query heads, as qwen3-235b-tp4, at test sizes
    "head_size": 64,
    "block_size": 16,
    "query_dtype": "bfloat16",
    "models": {"one-head": {"num_heads": 16, "num_kv_heads": 1}},
    "kv_dtypes": ["bfloat16", "int8"],
    "num_seqs": [1, 2],
    "context_lens": [100, 300],
    "max_tokens_per_case": 600,
    "mixed_lengths": {"num_seqs": 2, "min_len": 16, "max_len": 300, "seed": 0},
}


@pytest.fixture(scope="module")
def probe():
    return load_script("benchmarks/probe_second_call.py")


@pytest.mark.parametrize("kv", ["bf16", "int8"])
def test_each_launch_runs_the_call_on_its_data(probe, device, kv):
    spec = probe.case_spec(WORKLOAD, f"one-head:2:300:{kv}")
    launches, data = probe.second_call_launches(spec, "torch", device)
    skip_if_unsupported("torch", {k: v for k, v in data["A"].items() if k not in ("exp_sums", "max_logits", "tmp_out", "out_")})
    assert not torch.equal(data["A"]["K"], data["B"]["K"])
    for name in data:
        data[name]["out_"].fill_(float("nan"))
    launches["then_other"]()
    launches["then_same"]()
    for name in data:
        given = {k: v for k, v in data[name].items() if k not in ("exp_sums", "max_logits", "tmp_out", "out_")}
        torch.testing.assert_close(data[name]["out_"].float(), reference_paged_attention(**given), rtol=2e-2, atol=2e-2)
    launches["fill_twice"]()


def test_a_case_off_the_grid_is_refused(probe):
    with pytest.raises(ValueError, match="not one case of the grid"):
        probe.case_spec(WORKLOAD, "one-head:3:300:bf16")
    with pytest.raises(ValueError, match="MODEL:NUM_SEQS:CTX:KV"):
        probe.case_spec(WORKLOAD, "one-head:1:300")
