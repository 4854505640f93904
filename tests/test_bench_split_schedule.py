"""benchmarks/bench_split_schedule.py: the schedules it times are the ones it names
(checked with the Triton backend, which runs under the CPU interpreter too)."""

import pytest
import torch

from pa_hybrid import paged_attention_common, reference_paged_attention
from pa_hybrid.backends.base import sm_count
from pa_hybrid.backends.triton import BACKEND as TRITON
from pa_hybrid.testing import make_decode_case

from conftest import load_script, skip_if_unsupported


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/bench_split_schedule.py")


@pytest.mark.parametrize("name, partition", [("static", None), ("static-256", 256), ("static-1024", 1024)])
def test_static_schedules_launch_their_partition_and_stay_right(bench, device, monkeypatch, name, partition):
    case = make_decode_case([40, 600, 0, 1000], num_heads=8, num_kv_heads=2, device=device)
    skip_if_unsupported("triton", case)
    own = TRITON.partition_size  # the backend's own size, read outside the override
    ran = []
    launch = type(TRITON).launch
    monkeypatch.setattr(TRITON, "launch", lambda call, *schedule: ran.append((call, schedule)) or launch(TRITON, call, *schedule))
    with bench.split_schedule("triton", name):
        out = paged_attention_common(exp_sums=None, max_logits=None, tmp_out=None, backend="triton", **case)
    ((call, schedule),) = ran
    assert schedule[1] == (partition or own(call, sm_count(call.key.device_type, call.key.device_index)))
    torch.testing.assert_close(out.float(), reference_paged_attention(**case), rtol=3e-2, atol=3e-2)
    assert TRITON.partition_size == own  # the override ends with the block


def test_every_fixed_partition_fits_the_256_token_scratch(bench):
    fixed = [p for _, _, p in bench.SCHEDULES.values() if p is not None]
    assert fixed and all(p % 256 == 0 for p in fixed)
