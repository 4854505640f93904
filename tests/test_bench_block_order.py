"""benchmarks/bench_block_order.py: the in-order copy of a call is the same problem (the
reference and a backend give the same output), its blocks consecutive per sequence."""

import pytest
import torch

from pa_hybrid import paged_attention_common, reference_paged_attention
from pa_hybrid.testing import make_decode_case

from conftest import load_script, skip_if_unsupported


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/bench_block_order.py")


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
def test_blocks_in_order_is_the_same_problem(bench, device, kv_dtype):
    case = make_decode_case([40, 0, 600, 17], num_heads=8, num_kv_heads=2, head_size=64, kv_dtype=kv_dtype, device=device)
    kwargs = dict(case, out_=torch.full_like(case["Q"], float("nan")))
    moved = bench.blocks_in_order(kwargs)
    counts = [-(-n // 16) for n in (40, 0, 600, 17)]
    starts = [sum(counts[:i]) for i in range(len(counts))]
    for s, (start, n) in enumerate(zip(starts, counts)):
        assert moved["block_tables"][s, :n].tolist() == list(range(start, start + n))
        assert torch.equal(moved["K"][start : start + n], case["K"][case["block_tables"][s, :n].long()])
    assert moved["out_"].data_ptr() != kwargs["out_"].data_ptr()
    given = {k: v for k, v in moved.items() if k != "out_"}
    torch.testing.assert_close(reference_paged_attention(**given), reference_paged_attention(**case), rtol=0, atol=0)
    skip_if_unsupported("triton", case)
    out = paged_attention_common(**moved, exp_sums=None, max_logits=None, tmp_out=None, backend="triton")
    tol = 3e-2 * (2 if kv_dtype.itemsize == 1 else 1)
    torch.testing.assert_close(out.float(), reference_paged_attention(**case), rtol=tol, atol=tol)
