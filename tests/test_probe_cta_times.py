"""benchmarks/probe_cta_times.py: its patch of the stage-1 kernel still applies and compiles
for sm_90a without spilling (NVRTC, no GPU), and its wave-end summary of per-CTA records."""

import dataclasses

import pytest
import torch

from conftest import load_script, nvrtc_unavailable_reason
from pa_hybrid.backends import hip
from pa_hybrid.runtime import compiler, env


@pytest.fixture(scope="module")
def probe():
    return load_script("benchmarks/probe_cta_times.py")


def test_patched_kernel_compiles_without_spilling(probe):
    reason = nvrtc_unavailable_reason()
    if reason:
        pytest.skip(reason)
    csrc = probe.patched_csrc(env.csrc_dir(), hip.SOURCE)
    assert (csrc / hip.SOURCE).read_text().count("%%globaltimer") == 2
    spec = dataclasses.replace(hip.kernel_spec(torch.bfloat16, torch.bfloat16, 128, 16, False, 16, "sm_90a"), source_dir=csrc)
    for usage in compiler.compile_kernel(spec).usage.values():
        assert not usage.spills, usage


def test_a_moved_kernel_is_refused(probe):
    with pytest.raises(ValueError, match="entry or end moved"):
        probe.patched_source("__global__ void other() {}\n")


def test_wave_end(probe):
    # 4 SMs: SM 0 busy 0-10 us, SM 1 0-5 us, SM 2 no CTA, SM 3 2-10 us (two CTAs)
    start = torch.tensor([0, 0, 2000, 3000]) + 10**9
    end = torch.tensor([10000, 5000, 4000, 10000]) + 10**9
    w = probe.wave_end(start, end, torch.tensor([0, 1, 3, 3]), num_sms=4)
    assert w["span_us"] == 10.0 and w["ctas"] == 4 and w["start_spread_us"] == 3.0
    assert w["cta_us"] == (2.0, 5.0, 10.0)  # (torch's median of an even count: the lower middle)
    assert w["idle_at_end"] == pytest.approx((0 + 5 + 10 + 0) / 40)
    assert w["sms_done_before_90pct"] == 2
    assert w["tail_after_median_end_us"] == pytest.approx(10.0 - 5.0)


def test_cta_tokens_static(probe):
    # 3 partitions of 100 tokens, 2 kv heads, 2 sequences of 250 and 30 tokens; x fastest, then y, then z
    tokens = probe.cta_tokens((3, 2, 2), 100, [250, 30], balanced=False)
    assert tokens.tolist() == [100, 100, 50] * 2 + [30, 0, 0] * 2


def test_cta_tokens_balanced(probe):
    # pages of 100 tokens: 250 -> 100, 100, 50; 0 -> none; 130 -> 100, 30; 5 pages over 2 programs: 3 + 2
    tokens = probe.cta_tokens((2, 3, 1), 100, [250, 0, 130], balanced=True)
    assert tokens.tolist() == [250, 130] * 3
    # more programs than pages: one page each, the rest empty
    assert probe.cta_tokens((4, 1, 1), 100, [150], balanced=True).tolist() == [100, 50, 0, 0]
    assert probe.cta_tokens((2, 1, 1), 100, [0, 0], balanced=True).tolist() == [0, 0]


def test_sm_load(probe):
    # SM 0: 300 tokens, ends at 9 us; SM 1: 100, ends at 3; SM 2: 200, ends at 6; SM 3: no CTA
    tokens = torch.tensor([100, 200, 100, 200])
    end = torch.tensor([4000, 9000, 3000, 6000])
    s = probe.sm_load(tokens, end, torch.tensor([0, 0, 1, 2]), num_sms=4)
    assert s["sm_tokens"] == (0.0, 100.0, 300.0)  # (torch's median of an even count: the lower middle)
    assert s["sm_tokens_max_over_mean"] == pytest.approx(300 / 150)
    assert s["sm_end_tokens_corr"] == pytest.approx(1.0)  # end = 30 ns per token on every SM that ran
