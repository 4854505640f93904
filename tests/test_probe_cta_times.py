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
