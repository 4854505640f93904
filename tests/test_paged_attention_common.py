"""paged_attention_common end to end, every backend this machine can run, against the reference.

One case function (``check_against_reference``) serves every backend: the output
is poisoned with NaN first, the call goes through the public API, and the result
is compared with ``reference_paged_attention`` (float32) under per-dtype tolerances.
"""

import pytest
import torch

import pa_hybrid
from pa_hybrid import dispatch, paged_attention_common, reference_paged_attention
from pa_hybrid.layouts import allocate_scratch
from pa_hybrid.testing import make_decode_case, scale_tokens_along_context

from conftest import DEVICE, skip_if_unsupported

BACKENDS = [b for b in dispatch.available_backends(DEVICE)]

# relative Frobenius error bounds (the bars), and elementwise bounds for bf16/fp16 outputs
REL_TOL = {2: 1e-2, 1: 3e-2}
ELEM_TOL = {torch.bfloat16: 3e-2, torch.float16: 1e-2}


def check_against_reference(case, backend, *, give_scratch=False, give_out=True, scratch_seq_len=None):
    skip_if_unsupported(backend, case)
    q = case["Q"]
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device) if give_out else None
    scratch = (None, None, None)
    if give_scratch:
        scratch = allocate_scratch(q.shape[0], q.shape[1], q.shape[2], scratch_seq_len or case["max_seq_len"], q.device)
        for t in scratch:
            t.fill_(float("nan"))
    result = paged_attention_common(
        exp_sums=scratch[0], max_logits=scratch[1], tmp_out=scratch[2], out_=out, backend=backend, **case
    )
    if give_out:
        assert result is out
    assert result.shape == q.shape and result.dtype == q.dtype
    ref = reference_paged_attention(**case)
    assert not torch.isnan(result).any(), "unwritten (NaN-poisoned) output elements"
    kv_bytes = case["K"].element_size()
    rel = ((result.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert rel < REL_TOL[kv_bytes], f"relative error {rel:.3e} with backend {backend}"
    tol = ELEM_TOL[q.dtype] * (2 if kv_bytes == 1 else 1)
    torch.testing.assert_close(result.float(), ref, rtol=tol, atol=tol)
    return result, ref


def check_rows_against_reference(case, backend, bound):
    """The bound on every (row, head) vector's relative error: scale-free, unlike an atol."""
    out = paged_attention_common(exp_sums=None, max_logits=None, tmp_out=None, backend=backend, **case)
    ref = reference_paged_attention(**case)
    rel = (out.float() - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert rel.max().item() < bound, f"worst (row, head) relative error {rel.max().item():.3e}"


# (kv dtype, q dtype, gqa, max_qlen, head_size, block_size, scales)
CONFIGS = [
    (torch.bfloat16, torch.bfloat16, 1, 1, 128, 16, "per_token"),
    (torch.bfloat16, torch.bfloat16, 4, 1, 128, 16, "per_token"),
    (torch.bfloat16, torch.bfloat16, 8, 1, 64, 32, "per_token"),
    (torch.bfloat16, torch.bfloat16, 16, 1, 256, 16, "per_token"),
    (torch.float16, torch.float16, 6, 1, 128, 16, "per_token"),
    (torch.float16, torch.float16, 2, 2, 64, 16, "per_token"),
    (torch.bfloat16, torch.bfloat16, 4, 4, 128, 32, "per_token"),
    (torch.bfloat16, torch.bfloat16, 16, 4, 64, 16, "per_token"),
    (torch.bfloat16, torch.bfloat16, 5, 3, 128, 16, "per_token"),
    (torch.float8_e4m3fn, torch.bfloat16, 8, 1, 128, 16, "per_token"),
    (torch.float8_e4m3fn, torch.bfloat16, 4, 3, 64, 32, "per_tensor"),
    (torch.float8_e4m3fn, torch.float16, 2, 1, 128, 16, "both"),
    (torch.int8, torch.bfloat16, 16, 1, 128, 16, "per_token"),
    (torch.int8, torch.float16, 3, 2, 64, 16, "per_tensor"),
    (torch.int8, torch.bfloat16, 1, 1, 256, 32, "per_token"),
    # groups past 16 rows: MQA-sized GQA and long speculative drafts (asm's 32-row kernels, hip's
    # two row tiles up to 32 rows; Triton splits groups of more than 64 rows over programs)
    (torch.bfloat16, torch.bfloat16, 32, 1, 128, 16, "per_token"),
    (torch.float16, torch.float16, 4, 8, 128, 16, "per_token"),
    (torch.float8_e4m3fn, torch.float16, 6, 4, 64, 32, "per_token"),
    (torch.int8, torch.bfloat16, 1, 16, 128, 16, "per_token"),
    (torch.float8_e4m3fn, torch.bfloat16, 40, 2, 64, 32, "per_token"),
    (torch.bfloat16, torch.bfloat16, 72, 1, 64, 16, "per_token"),
    (torch.float16, torch.float16, 48, 1, 256, 16, "per_token"),  # Triton's largest tile: 64 rows x 256 dims
]

# ragged: empty, single token, around block and partition edges, several partitions
RAGGED = [0, 1, 15, 16, 17, 255, 256, 257, 700]


def _id(cfg):
    kv, q, gqa, qlen, hs, bs, sc = cfg
    return f"kv={str(kv)[6:]}-q={str(q)[6:]}-gqa{gqa}-qlen{qlen}-d{hs}-bs{bs}-{sc}"


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_matches_reference(device, backend, cfg):
    kv, q, gqa, qlen, hs, bs, scales = cfg
    case = make_decode_case(
        RAGGED,
        num_heads=2 * gqa,
        num_kv_heads=2,
        head_size=hs,
        block_size=bs,
        kv_dtype=kv,
        q_dtype=q,
        max_qlen=qlen,
        scales=scales,
        strided_q=(gqa % 2 == 0),
        device=device,
    )
    check_against_reference(case, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_caller_scratch_larger_than_needed(device, backend):
    case = make_decode_case([300, 5, 1000], num_heads=8, num_kv_heads=2, head_size=64, device=device)
    check_against_reference(case, backend, give_scratch=True, scratch_seq_len=2000)


@pytest.mark.parametrize("backend", BACKENDS)
def test_allocates_out_and_scratch(device, backend):
    case = make_decode_case([600, 3], num_heads=4, num_kv_heads=1, head_size=64, device=device)
    check_against_reference(case, backend, give_out=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_contexts_empty_give_zeros(device, backend):
    case = make_decode_case([0, 0], num_heads=4, num_kv_heads=2, device=device)
    case["max_seq_len"] = 300  # scratch for two partitions, none used
    case["block_tables"] = torch.zeros(2, 19, dtype=torch.int32, device=device)
    case["block_tables_stride0"] = 19
    skip_if_unsupported(backend, case)
    out = torch.full_like(case["Q"], float("nan"))
    paged_attention_common(exp_sums=None, max_logits=None, tmp_out=None, out_=out, backend=backend, **case)
    assert out.abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_context_many_partitions(device, backend):
    case = make_decode_case([5000, 2100], num_heads=4, num_kv_heads=1, head_size=64, device=device)
    check_against_reference(case, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_qlen_without_qo_indptr(device, backend):
    case = make_decode_case([40, 300], num_heads=4, num_kv_heads=2, head_size=64, max_qlen=2, device=device)
    case["qo_indptr"] = None  # every sequence has max_qlen new tokens
    check_against_reference(case, backend)


# (query factor, K scale factor, V scale factor, spread): the logits stay those of the plain
# case (query x K scale is unchanged), the output moves with the V scales. bf16 queries of
# 2^18 are past fp16's range; V scales of 2^-20 put p * scale below fp16's normal range and
# 2^20 above its largest value (2^-8 and 2^-12 with fp16 queries, whose output must stay normal
# fp16: p * scale falls below 2^-14, to about 2^-18 at 2^-12); ``spread`` multiplies each token's V scale by 2^U(-s, s)
# (spread K scales would make logits too large for the bf16 logits the torch backend keeps).
MAGNITUDES = [
    (2.0**18, 2.0**-18, 2.0**-20, 0),
    (2.0**-18, 2.0**18, 2.0**20, 0),
    (2.0**-12, 2.0**12, 2.0**-8, 0),
    (1.0, 1.0, 2.0**-12, 0),
    (1.0, 1.0, 1.0, 12),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("magnitudes", MAGNITUDES, ids=lambda m: "q{:g}-ks{:g}-vs{:g}-spread{}".format(*m))
@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.int8], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
def test_8bit_scales_and_queries_far_from_one(device, backend, magnitudes, kv_dtype, q_dtype):
    q_factor, k_factor, v_factor, spread = magnitudes
    if q_dtype == torch.float16 and max(q_factor, v_factor) > 1:
        pytest.skip("fp16 cannot hold these queries or their output")
    case = make_decode_case(
        [1, 17, 300, 1500], num_heads=16, num_kv_heads=2, q_dtype=q_dtype, kv_dtype=kv_dtype, scales="per_token",
        device=device,
    )
    skip_if_unsupported(backend, case)
    jitter = 2.0 ** (spread * (2 * torch.rand(case["V_QScale_asm"].shape, device=device) - 1))
    case.update(
        Q=case["Q"] * q_factor,
        K_QScale_asm=case["K_QScale_asm"] * k_factor,
        V_QScale_asm=case["V_QScale_asm"] * v_factor * jitter,
    )
    check_rows_against_reference(case, backend, REL_TOL[1])  # the bound of the plain case


# Logits whose running max climbs along the context: slowly (every block a little above the
# last) and at once (one stretch 6x the rest, then back: its largest weights are 2^10 to 2^24
# times the earlier max's, often past fp16's range for a kernel that rescaled late or never).
LOGIT_PROFILES = {
    "ramp": lambda x: 2.0 ** (2 * x - 1),
    "spike": lambda x: 6.0 if 0.45 < x < 0.55 else 1.0,
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("profile", LOGIT_PROFILES)
@pytest.mark.parametrize(
    "kv_dtype,q_dtype",
    [
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.float8_e4m3fn, torch.bfloat16),
        (torch.float8_e4m3fn, torch.float16),  # fp16 weights in V units (hip): no stale max there
        (torch.int8, torch.bfloat16),
    ],
    ids=lambda d: str(d)[6:],
)
def test_logits_whose_max_climbs_along_the_context(device, backend, profile, kv_dtype, q_dtype):
    case = make_decode_case([3000, 700, 1, 4100], num_heads=8, num_kv_heads=2, q_dtype=q_dtype, kv_dtype=kv_dtype, device=device)
    skip_if_unsupported(backend, case)
    if backend == "torch" and q_dtype == torch.bfloat16:
        pytest.skip("the torch backend keeps logits in the query dtype: bf16 logits this large are off by percents")
    scale_tokens_along_context(case, LOGIT_PROFILES[profile])
    check_rows_against_reference(case, backend, REL_TOL[kv_dtype.itemsize])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.int8], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
def test_v_scales_that_climb_along_the_context(device, backend, kv_dtype, q_dtype):
    """Per-token V scales 2^-12 times the case's on each sequence's first 30% of tokens and 2^12
    times after: fp16 weights p * v_scale / unit with the unit fixed at the first block (or tile)
    would reach 2^24, past fp16's range."""
    case = make_decode_case(
        [1, 17, 300, 1500], num_heads=16, num_kv_heads=2, q_dtype=q_dtype, kv_dtype=kv_dtype, scales="per_token",
        device=device,
    )
    skip_if_unsupported(backend, case)
    scale_tokens_along_context(case, lambda x: 2.0**-12 if x < 0.3 else 2.0**12, of="V")
    check_rows_against_reference(case, backend, REL_TOL[1])


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
@pytest.mark.parametrize("scales", ["per_tensor", "per_token"])
@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.int8], ids=lambda d: str(d)[6:])
def test_8bit_keys_past_fp16_range_under_fp16_queries(device, backend, kv_dtype, scales):
    """K scales 2^16 times the case's and the softmax scale 2^-16 times: the logits of the plain
    case, from dequantized keys past fp16's largest value (65504)."""
    case = make_decode_case(
        [1, 17, 300], num_heads=8, num_kv_heads=2, q_dtype=torch.float16, kv_dtype=kv_dtype, scales=scales, device=device
    )
    skip_if_unsupported(backend, case)
    name = "K_QScale_asm" if scales == "per_token" else "K_QScale_hip"
    case.update({name: case[name] * 2.0**16, "scale": case["scale"] * 2.0**-16})
    check_rows_against_reference(case, backend, REL_TOL[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_cache_stored_as_uint8(device, backend):
    case = make_decode_case([70, 300], num_heads=8, num_kv_heads=2, head_size=64, kv_dtype=torch.float8_e4m3fn, device=device)
    skip_if_unsupported(backend, case)
    expected = reference_paged_attention(**case)
    for extra in ({"kv_cache_dtype": "fp8"}, {"kv_cache_tensor_dtype": torch.float8_e4m3fn}):
        c = dict(case, K=case["K"].view(torch.uint8), V=case["V"].view(torch.uint8), **extra)
        out = paged_attention_common(exp_sums=None, max_logits=None, tmp_out=None, backend=backend, **c)
        rel = ((out.float() - expected).norm() / expected.norm()).item()
        assert rel < REL_TOL[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_views_with_padded_block_and_head_strides(device, backend):
    case = make_decode_case([200, 33], num_heads=4, num_kv_heads=2, head_size=64, device=device)
    K, V = case["K"], case["V"]
    # K and V as views into larger allocations: block and head strides differ from contiguous
    big_k = torch.randn((K.shape[0], K.shape[1] + 1) + K.shape[2:], device=device).to(K.dtype)
    big_v = torch.randn((V.shape[0], V.shape[1] + 2) + V.shape[2:], device=device).to(V.dtype)
    big_k[:, 1:].copy_(K)
    big_v[:, :2].copy_(V)
    case.update(K=big_k[:, 1:], V=big_v[:, :2])
    check_against_reference(case, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fresh_inputs_give_fresh_outputs(device, backend):
    """Two different problems of the same shapes through the same (cached) selection."""
    for _ in range(2):
        case = make_decode_case([90, 400], num_heads=8, num_kv_heads=2, head_size=64, device=device)
        check_against_reference(case, backend, give_scratch=True)


def test_auto_picks_a_backend_that_exists(device):
    case = make_decode_case([10], num_heads=4, num_kv_heads=1, head_size=64, device=device)
    no_scratch = dict(exp_sums=None, max_logits=None, tmp_out=None)
    sel = pa_hybrid.explain(**no_scratch, **case)
    assert sel.backend in BACKENDS
    assert pa_hybrid.select_backend(**no_scratch, **case) == sel.backend
    # the native backends are not part of this build: they are skipped with a reason
    for name, reason in sel.skipped.items():
        assert reason


def poison_unused_slots(case):
    """NaN in every cache slot no context covers (the tail of each sequence's last block, the
    blocks nobody uses) and, for per-token scaled 8-bit caches, NaN scales there: what an
    engine's cache may hold. int8 has no NaN, so its values stay and its scales carry it."""
    K, V = case["K"], case["V"]
    num_blocks, _, _, block_size, _ = K.shape
    live = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=K.device)
    for s, n in enumerate(case["context_lens"].tolist()):
        t = torch.arange(n, device=K.device)
        live[case["block_tables"][s, t // block_size].long() * block_size + t % block_size] = True
    dead = ~live.view(num_blocks, block_size)
    if K.dtype != torch.int8:
        k, v = pa_hybrid.unshuffle_to_nhd(K, V)  # [blocks, block_size, kv_heads, head_size]
        if k.dtype == torch.float8_e4m3fn:  # no masked fill for fp8: write its NaN bits
            k.view(torch.uint8)[dead], v.view(torch.uint8)[dead] = 0x7F, 0x7F
        else:
            k[dead], v[dead] = float("nan"), float("nan")
        k, v = pa_hybrid.shuffle_from_nhd(k, v)
        K.copy_(k), V.copy_(v)
    for name in ("K_QScale_asm", "V_QScale_asm"):
        if case.get(name) is not None:
            case[name].transpose(1, 2)[dead] = float("nan")  # [blocks, kv_heads, block_size]


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.int8], ids=lambda d: str(d)[6:])
def test_unused_cache_slots_holding_nan_do_not_leak(device, backend, kv_dtype):
    case = make_decode_case([0, 1, 15, 17, 300], num_heads=8, num_kv_heads=2, kv_dtype=kv_dtype, device=device)
    poison_unused_slots(case)
    check_against_reference(case, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=lambda d: str(d)[6:])
def test_context_past_max_seq_len_counts_as_max_seq_len(device, backend, kv_dtype):
    """validate="shapes" reads no lengths, so a context longer than ``max_seq_len`` (a caller's
    bug) is not caught: every backend attends to its first ``max_seq_len`` tokens, and none
    reads past the block-table row or the scratch, both sized by ``max_seq_len``. The table is a
    17-column view of a wider one whose hidden columns, and every token past 260, point at a
    block of NaN; the scratch holds 2 partitions, NaN-poisoned, beside the next head's."""
    case = make_decode_case([300, 40, 299], num_heads=8, num_kv_heads=2, head_size=64, kv_dtype=kv_dtype, device=device)
    limit, columns = 260, 17  # 17 blocks of 16 tokens hold 260
    skip_if_unsupported(backend, dict(case, max_seq_len=limit))
    poison_unused_slots(case)  # NaN in the blocks no context uses, among others
    table = case["block_tables"]
    used = {int(b) for s, n in enumerate(case["context_lens"].tolist()) for b in table[s, : -(-n // 16)].tolist()}
    nan_block = next(b for b in range(case["K"].shape[0]) if b not in used)
    table[:, columns:] = nan_block
    ref_case = dict(case, context_lens=case["context_lens"].clamp(max=limit))
    past_limit = torch.arange(limit, 300, device=device)  # the tokens of blocks 16..18 past 260: NaN too
    for s in (0, 2):
        k, v = pa_hybrid.unshuffle_to_nhd(case["K"], case["V"])
        blocks, slots = table[s, past_limit // 16].long(), past_limit % 16
        keep = blocks != nan_block
        if kv_dtype == torch.float8_e4m3fn:
            k.view(torch.uint8)[blocks[keep], slots[keep]] = 0x7F
            v.view(torch.uint8)[blocks[keep], slots[keep]] = 0x7F
        else:
            k[blocks[keep], slots[keep]], v[blocks[keep], slots[keep]] = float("nan"), float("nan")
        k, v = pa_hybrid.shuffle_from_nhd(k, v)
        case["K"].copy_(k), case["V"].copy_(v)
    ref = reference_paged_attention(**dict(ref_case, K=case["K"], V=case["V"]))
    q = case["Q"]
    scratch = allocate_scratch(q.shape[0], q.shape[1], q.shape[2], limit, q.device)
    for t in scratch:
        t.fill_(float("nan"))
    out = torch.full_like(q, float("nan"))
    narrow = dict(case, block_tables=table[:, :columns], block_tables_stride0=table.stride(0), max_seq_len=limit)
    paged_attention_common(exp_sums=scratch[0], max_logits=scratch[1], tmp_out=scratch[2], out_=out, backend=backend, **narrow)
    assert not out.isnan().any()
    tol = ELEM_TOL[q.dtype] * (2 if case["K"].element_size() == 1 else 1)
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_table_entries_past_a_context_may_hold_anything(device, backend):
    """Only the entries a context covers must be block ids (what validate="full" checks);
    engines leave -1 or stale values in the rest."""
    case = make_decode_case([40, 300, 1], num_heads=8, num_kv_heads=2, head_size=64, device=device)
    table = case["block_tables"]
    for s, n in enumerate(case["context_lens"].tolist()):
        table[s, -(-n // 16) :] = torch.tensor([-1, 10**6], dtype=torch.int32, device=device).repeat(table.shape[1])[
            : table.shape[1] - -(-n // 16)
        ]
    skip_if_unsupported(backend, case)
    paged_attention_common(exp_sums=None, max_logits=None, tmp_out=None, backend=backend, validate="full", **case)
    check_against_reference(case, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "q_dtype,kv_dtype,q_factor", [(torch.bfloat16, torch.float16, 4.0), (torch.float16, torch.bfloat16, 2.0**-17)],
    ids=["q-bf16-kv-fp16", "q-fp16-kv-bf16"],
)
@pytest.mark.parametrize("max_qlen", [1, 2])
def test_16bit_cache_of_the_other_16bit_type(device, backend, q_dtype, kv_dtype, q_factor, max_qlen):
    """bf16 queries over an fp16 cache (logits spread by 4x queries: bf16 would drop the cache's 3
    extra bits), fp16 queries over a bf16 cache whose K is past fp16's range (queries 2^-17, keys
    2^17: the logits of the plain case)."""
    case = make_decode_case(
        [1, 17, 300, 700], num_heads=8, num_kv_heads=2, q_dtype=q_dtype, kv_dtype=kv_dtype, max_qlen=max_qlen,
        device=device,
    )
    skip_if_unsupported(backend, case)
    case.update(Q=(case["Q"].float() * q_factor).to(q_dtype), K=(case["K"].float() / q_factor).to(kv_dtype))
    check_rows_against_reference(case, backend, REL_TOL[2])


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.int8], ids=str)
def test_no_sequences(device, backend, kv_dtype):
    """An empty batch (as a padded engine step can be): nothing launched, an empty result."""
    case = make_decode_case([], num_heads=8, num_kv_heads=1, head_size=128, kv_dtype=kv_dtype, device=device)
    case.update(max_seq_len=300, block_tables=torch.zeros(0, 19, dtype=torch.int32, device=device), block_tables_stride0=19)
    skip_if_unsupported(backend, case)
    out = paged_attention_common(exp_sums=None, max_logits=None, tmp_out=None, backend=backend, **case)
    assert out.shape == (0, 8, 128)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_new_token_anywhere(device, backend):
    """max_qlen > 1 and every sequence without a new token: Q has no row, nothing to do."""
    case = make_decode_case([40, 7], num_heads=4, num_kv_heads=1, head_size=64, max_qlen=2, new_tokens=[0, 0], device=device)
    skip_if_unsupported(backend, case)
    out = paged_attention_common(exp_sums=None, max_logits=None, tmp_out=None, backend=backend, **case)
    assert out.shape == (0, 4, 64)
