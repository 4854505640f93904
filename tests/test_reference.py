"""The oracle itself: reference_paged_attention against a float64 loop over
unpaged (contiguous) K and V, one (query row, head) at a time.

The unpaged copy is written here by plain indexing of the shuffled layout's
definition (K[b, h, d // x, t, d % x], V[b, h, t // x, d, t % x]), independent of
the reference's own gather.
"""

import math

import pytest
import torch

from pa_hybrid import reference_paged_attention
from pa_hybrid.testing import make_decode_case


def unpaged_kv(case, seq, kv_dtype):
    """float64 (k, v) of one sequence, [ctx, kv_heads, head_size], dequantized, by explicit loops over tokens."""
    K, V = case["K"], case["V"]
    ctx = int(case["context_lens"][seq])
    _, kvh, _, bs, x = K.shape
    d = K.shape[2] * x
    k = torch.empty(ctx, kvh, d, dtype=torch.float64)
    v = torch.empty(ctx, kvh, d, dtype=torch.float64)
    dims = torch.arange(d)
    for t in range(ctx):
        b = int(case["block_tables"][seq, t // bs])
        o = t % bs
        k[t] = K[b, :, dims // x, o, dims % x].double()
        v[t] = V[b, :, o // x, dims, o % x].double()
        if kv_dtype.itemsize == 1:
            if "K_QScale_asm" in case:
                k[t] *= case["K_QScale_asm"][b, :, o].double()[:, None]
                v[t] *= case["V_QScale_asm"][b, :, o].double()[:, None]
            else:
                k[t] *= float(case["K_QScale_hip"])
                v[t] *= float(case["V_QScale_hip"])
    return k, v


def naive_attention(case, kv_dtype):
    Q = case["Q"].double()
    rows, heads, d = Q.shape
    kvh = case["K"].shape[1]
    gqa = heads // kvh
    num_seqs = case["context_lens"].shape[0]
    qlen = case["max_qlen"]
    indptr = case["qo_indptr"].tolist() if case["qo_indptr"] is not None else list(range(num_seqs + 1))
    out = torch.zeros(rows, heads, d, dtype=torch.float64)
    for s in range(num_seqs):
        ctx = int(case["context_lens"][s])
        k, v = unpaged_kv(case, s, kv_dtype)
        n = indptr[s + 1] - indptr[s]
        for i in range(n):
            seen = ctx - n + i + 1 if qlen > 1 else ctx
            if seen <= 0:
                continue
            for h in range(heads):
                logits = [case["scale"] * float(Q[indptr[s] + i, h] @ k[t, h // gqa]) for t in range(seen)]
                top = max(logits)
                w = [math.exp(l - top) for l in logits]
                total = sum(w)
                out[indptr[s] + i, h] = sum(wt * v[t, h // gqa] for t, wt in enumerate(w)) / total
    return out


@pytest.mark.parametrize(
    "kv_dtype,scales",
    [
        (torch.bfloat16, "per_token"),
        (torch.float16, "per_token"),
        (torch.float8_e4m3fn, "per_token"),
        (torch.float8_e4m3fn, "per_tensor"),
        (torch.int8, "per_token"),
        (torch.int8, "both"),
    ],
)
@pytest.mark.parametrize("gqa,qlen,block_size", [(1, 1, 16), (4, 1, 32), (3, 3, 16)])
def test_reference_matches_naive_loop(kv_dtype, scales, gqa, qlen, block_size):
    lens = [0, 1, 37, block_size, 2 * block_size + 5]
    case = make_decode_case(
        lens,
        num_heads=2 * gqa,
        num_kv_heads=2,
        head_size=32,
        block_size=block_size,
        kv_dtype=kv_dtype,
        q_dtype=torch.float16 if kv_dtype == torch.float16 else torch.bfloat16,
        max_qlen=qlen,
        new_tokens=[1, 1, 3, 2, 3] if qlen > 1 else None,
        scales=scales,
        strided_q=True,
    )
    got = reference_paged_attention(**case, compute_dtype=torch.float64)
    expected = naive_attention(case, kv_dtype)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # rows of empty contexts are exactly zero, and every other row is not
    assert got[0].abs().max() == 0
    assert got[1:].abs().amax(dim=(1, 2)).min() > 0


def test_reference_float32_close_to_float64():
    case = make_decode_case([300, 7], num_heads=8, num_kv_heads=2, head_size=64)
    f32 = reference_paged_attention(**case)
    f64 = reference_paged_attention(**case, compute_dtype=torch.float64)
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), f64, rtol=1e-5, atol=1e-6)


def test_reference_writes_out_when_given():
    case = make_decode_case([20, 3], num_heads=4, num_kv_heads=4, head_size=64)
    out = torch.full_like(case["Q"], float("nan"))
    ref = reference_paged_attention(**case, out_=out)
    torch.testing.assert_close(out, ref.to(out.dtype))


def test_reference_uint8_fp8_cache_means_e4m3():
    case = make_decode_case([40], num_heads=4, num_kv_heads=2, head_size=64, kv_dtype=torch.float8_e4m3fn)
    expected = reference_paged_attention(**case)
    case.update(K=case["K"].view(torch.uint8), V=case["V"].view(torch.uint8), kv_cache_dtype="fp8")
    torch.testing.assert_close(reference_paged_attention(**case), expected, rtol=0, atol=0)
