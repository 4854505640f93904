"""Every argument check of paged_attention_common: the error type, and a message
that names the argument. Checks that need device data run only with validate="full"."""

import inspect
import re

import pytest
import torch

from pa_hybrid import dispatch, explain, paged_attention_common
from pa_hybrid.call import build_call
from pa_hybrid.testing import make_decode_case


@pytest.fixture
def case(device):
    c = make_decode_case([20, 40], num_heads=8, num_kv_heads=2, head_size=64, device=device)
    c.update(exp_sums=None, max_logits=None, tmp_out=None)
    return c


def _fp8_case(device):
    c = make_decode_case([20, 40], num_heads=8, num_kv_heads=2, head_size=64, kv_dtype=torch.int8, device=device)
    c.update(exp_sums=None, max_logits=None, tmp_out=None)
    return c


BAD = [
    ("Q", lambda c: c.update(Q=c["Q"][0]), ValueError),
    ("Q", lambda c: c.update(Q=c["Q"].float()), TypeError),
    ("Q", lambda c: c.update(Q=c["Q"].transpose(1, 2).contiguous().transpose(1, 2)), ValueError),
    ("Q", lambda c: c.update(Q=c["Q"][:, :, :32]), ValueError),
    ("Q", lambda c: c.update(Q=c["Q"][:, :7]), ValueError),
    ("Q", lambda c: c.update(Q=c["Q"][:1]), ValueError),
    ("K", lambda c: c.update(K=c["K"].float()), TypeError),
    ("K", lambda c: c.update(K=c["K"][0]), ValueError),
    ("K", lambda c: c.update(K="not a tensor"), TypeError),
    ("V", lambda c: c.update(V=c["V"][:, :1]), ValueError),
    ("V", lambda c: c.update(V=c["V"].half()), TypeError),
    ("V", lambda c: c.update(V=c["V"].transpose(3, 4)), ValueError),
    ("block_tables", lambda c: c.update(block_tables=c["block_tables"].long()), TypeError),
    ("block_tables", lambda c: c.update(block_tables=c["block_tables"][:1]), ValueError),
    ("block_tables", lambda c: c.update(block_tables=c["block_tables"][0]), ValueError),
    ("block_tables_stride0", lambda c: c.update(block_tables_stride0=c["block_tables_stride0"] + 1), ValueError),
    ("context_lens", lambda c: c.update(context_lens=c["context_lens"].long()), TypeError),
    ("context_lens", lambda c: c.update(context_lens=c["context_lens"][None]), ValueError),
    ("scale", lambda c: c.update(scale=torch.tensor(0.1)), TypeError),
    ("scale", lambda c: c.update(scale=float("nan")), ValueError),
    ("scale", lambda c: c.update(scale=float("inf")), ValueError),
    ("max_qlen", lambda c: c.update(max_qlen=0), ValueError),
    ("max_seq_len", lambda c: c.update(max_seq_len=10_000), ValueError),
    ("max_seq_len", lambda c: c.update(max_seq_len=1.5), TypeError),
    ("qo_indptr", lambda c: c.update(max_qlen=2), ValueError),
    ("high_precision", lambda c: c.update(high_precision=3), ValueError),
    ("kernelName", lambda c: c.update(kernelName=5), TypeError),
    ("kv_cache_dtype", lambda c: c.update(kv_cache_dtype="fp4"), ValueError),
    ("kv_cache_dtype", lambda c: c.update(kv_cache_dtype="fp8"), ValueError),
    ("kv_cache_tensor_dtype", lambda c: c.update(kv_cache_tensor_dtype="bf16"), TypeError),
    ("out_", lambda c: c.update(out_=torch.empty_like(c["Q"][:1])), ValueError),
    ("out_", lambda c: c.update(out_=torch.empty_like(c["Q"], dtype=torch.float32)), TypeError),
    ("exp_sums", lambda c: c.update(exp_sums=torch.empty(2, 8, 1)), ValueError),
    ("backend", lambda c: c.update(backend="cuda"), ValueError),
    ("validate", lambda c: c.update(validate="none"), ValueError),
    ("Q", lambda c: c.update(Q=c["Q"][:, :0]), ValueError),  # no head
    ("K", lambda c: c.update(K=c["K"][:, :0], V=c["V"][:, :0]), ValueError),  # no kv head
    ("out_", lambda c: c.update(out_=torch.empty_like(c["Q"][:1]).expand(c["Q"].shape)), ValueError),  # self-overlapping
    ("out_", lambda c: c.update(out_=_overlapping_heads(c["Q"])), ValueError),  # heads half on each other
]


def _overlapping_heads(Q):
    """Q's shape, each head's second half the next head's first (no zero stride: torch's own
    overlap test cannot tell)."""
    rows, heads, d = Q.shape
    return torch.empty(rows * heads * d, dtype=Q.dtype, device=Q.device).as_strided(Q.shape, (heads * d, d // 2, 1))


@pytest.mark.parametrize("name,change,exc", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_argument_is_named(case, name, change, exc):
    change(case)
    with pytest.raises(exc, match=name):
        paged_attention_common(**case)


def test_scratch_shape_and_dtype_checked(case, device):
    rows, heads, d = case["Q"].shape
    good = dict(
        exp_sums=torch.empty(rows, heads, 1, device=device),
        max_logits=torch.empty(rows, heads, 1, device=device),
        tmp_out=torch.empty(rows, heads, 1, d, device=device),
    )
    paged_attention_common(**dict(case, **good))  # sized right: accepted
    for name, bad, exc in [
        ("max_logits", torch.empty(rows, heads, 1, dtype=torch.float64, device=device), TypeError),
        ("tmp_out", torch.empty(rows, heads, 1, d + 1, device=device), ValueError),
        ("tmp_out", torch.empty(rows, heads, 1, d, dtype=torch.int32, device=device), TypeError),
        ("exp_sums", torch.empty(rows + 1, heads, 1, device=device), ValueError),
    ]:
        with pytest.raises(exc, match=name):
            paged_attention_common(**dict(case, **dict(good, **{name: bad})))
    with pytest.raises(ValueError, match="exp_sums/max_logits/tmp_out"):
        paged_attention_common(**dict(case, exp_sums=good["exp_sums"]))


def test_8bit_cache_needs_scales(device):
    c = _fp8_case(device)
    with pytest.raises(ValueError, match="K_QScale"):
        paged_attention_common(**dict(c, K_QScale_asm=None, V_QScale_asm=None))
    with pytest.raises(ValueError, match="K_QScale_asm/V_QScale_asm"):
        paged_attention_common(**dict(c, V_QScale_asm=None))
    with pytest.raises(ValueError, match="K_QScale_asm"):
        paged_attention_common(**dict(c, K_QScale_asm=c["K_QScale_asm"][:, :1]))
    with pytest.raises(TypeError, match="V_QScale_asm"):
        paged_attention_common(**dict(c, V_QScale_asm=c["V_QScale_asm"].double()))
    with pytest.raises(ValueError, match="K_QScale_hip"):
        paged_attention_common(
            **dict(c, K_QScale_asm=None, V_QScale_asm=None, K_QScale_hip=torch.ones(2, device=device), V_QScale_hip=torch.ones(1, device=device))
        )


def test_head_size_must_divide_by_x(device):
    c = make_decode_case([5], num_heads=2, num_kv_heads=1, head_size=64, device=device)
    K = torch.zeros(c["K"].shape[0], 1, 8, 16, 4, dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match="K"):
        paged_attention_common(exp_sums=None, max_logits=None, tmp_out=None, **dict(c, K=K))


def test_mismatched_devices(case):
    if case["Q"].device.type == "cpu":
        pytest.skip("needs a GPU to put one tensor on another device")
    with pytest.raises(ValueError, match="context_lens"):
        paged_attention_common(**dict(case, context_lens=case["context_lens"].cpu()))


def test_forced_backend_that_cannot_run_says_why(case):
    c = make_decode_case([9], num_heads=2, num_kv_heads=1, head_size=64, device=case["Q"].device)
    with pytest.raises(ValueError, match="backend='asm' cannot run this call") as raised:
        paged_attention_common(exp_sums=None, max_logits=None, tmp_out=None, backend="asm", **c)
    reason = dispatch.unavailable_reason("asm", build_call(exp_sums=None, max_logits=None, tmp_out=None, **c).key)
    assert reason in str(raised.value)  # the reason of the backend in the asm slot
    if not torch.version.hip:  # the PTX kernels: no device here, or the head size (aiter's on ROCm may first name its wheel)
        assert re.search("no CUDA device|head_size 64 not in", reason), reason
    with pytest.raises(ValueError, match="head_size 48"):
        c = make_decode_case([9], num_heads=2, num_kv_heads=1, head_size=48, device=case["Q"].device)
        paged_attention_common(exp_sums=None, max_logits=None, tmp_out=None, backend="triton", **c)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda c: c["block_tables"].__setitem__((0, 0), 10_000), "block_tables"),
        (lambda c: c["block_tables"].__setitem__((1, 0), -1), "block_tables"),
        (lambda c: c["context_lens"].__setitem__(1, 41), "context_lens"),
        (lambda c: c["context_lens"].__setitem__(1, -3), "context_lens"),
    ],
)
def test_full_validation_reads_device_data(case, change, match):
    paged_attention_common(**dict(case, validate="full"))  # the valid case passes
    change(case)
    with pytest.raises(ValueError, match=match):
        paged_attention_common(**dict(case, validate="full"))


def test_full_validation_of_qo_indptr(device):
    c = make_decode_case([30, 30], num_heads=4, num_kv_heads=2, head_size=64, max_qlen=2, device=device)
    c.update(exp_sums=None, max_logits=None, tmp_out=None, validate="full")
    paged_attention_common(**c)
    c["qo_indptr"] = torch.tensor([0, 3, 4], dtype=torch.int32, device=device)  # 3 > max_qlen
    with pytest.raises(ValueError, match="qo_indptr"):
        paged_attention_common(**c)


def test_v_dtype_checked_before_the_kv_views(device):
    """A uint8 K names an 8-bit cache; a V of another dtype must not pass as its view."""
    c = _fp8_case(device)
    K = c["K"].view(torch.uint8)
    for V in (c["V"].view(torch.int8), c["V"].view(torch.bfloat16)):
        with pytest.raises(TypeError, match="V"):
            paged_attention_common(**dict(c, K=K, V=V, kv_cache_dtype="fp8"))


def test_outputs_must_not_share_memory(case, device):
    rows, heads, d = case["Q"].shape
    es, tmp = torch.empty(rows, heads, 1, device=device), torch.empty(rows, heads, 1, d, device=device)
    with pytest.raises(ValueError, match="max_logits: must not share memory with exp_sums"):
        paged_attention_common(**dict(case, exp_sums=es, max_logits=es, tmp_out=tmp))
    buffer = torch.empty(2 * rows * heads * (1 + d), device=device)  # one workspace, disjoint slices: fine
    es, ml = buffer[: rows * heads].view(rows, heads, 1), buffer[rows * heads : 2 * rows * heads].view(rows, heads, 1)
    tmp = buffer[2 * rows * heads : 2 * rows * heads + rows * heads * d].view(rows, heads, 1, d)
    paged_attention_common(**dict(case, exp_sums=es, max_logits=ml, tmp_out=tmp))
    with pytest.raises(ValueError, match="tmp_out: must not share memory with out_"):  # out_ inside the scratch
        paged_attention_common(**dict(case, exp_sums=es, max_logits=ml, tmp_out=tmp, out_=_alias_out(tmp, case["Q"])))


def test_nested_views_of_one_buffer_are_not_overlaps(case, device):
    """Views whose dims nest without being contiguous (out_ as the first half of each row of a
    wider buffer, tmp_out's partitions interleaved with another's) are accepted; the same
    tmp_out with partitions on each other is not."""
    rows, heads, d = case["Q"].shape
    wide = torch.empty(rows, heads, 2 * d, dtype=case["Q"].dtype, device=device)
    es, ml = torch.empty(rows, heads, 2, device=device), torch.empty(rows, heads, 2, device=device)
    pair = torch.empty(rows, heads, 2, 2, d, device=device)  # [.., partition, which, d]: ours is which = 0
    paged_attention_common(**dict(case, out_=wide[..., :d], exp_sums=es, max_logits=ml, tmp_out=pair[:, :, :, 0]))
    on_each_other = pair.view(-1).as_strided((rows, heads, 2, d), (heads * 4 * d, 4 * d, d // 2, 1))
    with pytest.raises(ValueError, match=r"tmp_out: its elements must not share memory"):
        paged_attention_common(**dict(case, exp_sums=es, max_logits=ml, tmp_out=on_each_other))


def _alias_out(tmp, Q):
    """An out_ of Q's dtype whose bytes are tmp_out's first bytes."""
    rows, heads, d = Q.shape
    flat = tmp.view(-1).view(torch.uint8)[: rows * heads * d * Q.element_size()]
    return flat.view(Q.dtype).view(rows, heads, d)


def test_explain_takes_every_argument_by_position(case):
    names = list(inspect.signature(paged_attention_common).parameters)
    positional = [case.get(n, inspect.signature(paged_attention_common).parameters[n].default) for n in names]
    assert explain(*positional).backend == explain(**case).backend


def test_full_validation_takes_contexts_shorter_than_their_new_tokens(device):
    """Padding: a sequence of length 0 in a batch with two new tokens per sequence (qo_indptr=None)."""
    c = make_decode_case([30, 0], num_heads=4, num_kv_heads=2, head_size=64, max_qlen=2, new_tokens=[2, 2], device=device)
    c.update(exp_sums=None, max_logits=None, tmp_out=None, qo_indptr=None, validate="full")
    out = paged_attention_common(**c)
    assert torch.equal(out[2:], torch.zeros_like(out[2:]))
