"""The balanced split-KV schedule (``kernels/common.py``, ``balanced_schedule``) of the
hip backend (on a GPU; tests/test_hip_rocm_compile.py runs its kernel on the CPU) and of
the Triton backend (here under the interpreter): stage-1 programs share a kv head's pages
whatever the mix of lengths, and the Triton reduce rebuilds the same schedule from
``context_lens``. Which calls take it (``PA_HYBRID_SPLIT_SCHEDULE``, ``auto`` by default).

Checked against the reference for stage-1 grids that hold every sequence whole in
one program, give one program several sequences, split one sequence over several
programs, or leave programs without pages; the scratch gets one extra poisoned
partition slot that must stay untouched (no piece is written past what
``scratch_shapes`` tells callers to allocate).
"""

import random

import pytest
import torch

from pa_hybrid import paged_attention_common, reference_paged_attention
from pa_hybrid.backends import base, hip
from pa_hybrid.backends.hip import BACKEND as HIP
from pa_hybrid.backends.triton import BACKEND as TRITON
from pa_hybrid.call import build_call
from pa_hybrid.kernels import reduce
from pa_hybrid.layouts import PARTITION_SIZE, max_num_partitions
from pa_hybrid.testing import make_decode_case

from conftest import skip_if_unsupported

# 14 pages over 13 sequences, with empty ones first, in the middle and last
RAGGED = [0, 1, 15, 300, 256, 257, 0, 700, 5, 1100, 16, 64, 0]

# (kv dtype, q dtype, gqa, max_qlen, head_size, block_size, scales)
CONFIGS = [
    (torch.bfloat16, torch.bfloat16, 4, 1, 128, 16, "per_token"),
    (torch.float16, torch.float16, 1, 2, 64, 32, "per_token"),
    (torch.float8_e4m3fn, torch.bfloat16, 8, 1, 128, 16, "per_token"),
    (torch.int8, torch.bfloat16, 3, 3, 64, 16, "per_tensor"),  # (hip builds no balanced kernel for fp16 over 8-bit)
    (torch.bfloat16, torch.bfloat16, 20, 4, 64, 16, "per_token"),  # 80 rows: Triton's group takes two programs
]


def _id(cfg):
    kv, q, gqa, qlen, hs, bs, sc = cfg
    return f"kv={str(kv)[6:]}-q={str(q)[6:]}-gqa{gqa}-qlen{qlen}-d{hs}-bs{bs}-{sc}"


def _guarded_scratch(rows, num_heads, head_size, max_seq_len, device):
    """NaN scratch with one partition slot more than callers allocate, and views of the
    size they do allocate."""
    parts = max_num_partitions(max_seq_len)
    full = (
        torch.full((rows, num_heads, parts + 1), float("nan"), device=device),
        torch.full((rows, num_heads, parts + 1), float("nan"), device=device),
        torch.full((rows, num_heads, parts + 1, head_size), float("nan"), device=device),
    )
    return full, (full[0][..., :parts], full[1][..., :parts], full[2][..., :parts, :])


SPLIT_KV = {"hip": HIP, "triton": TRITON}


@pytest.mark.parametrize("reduce_min_programs", [reduce.REDUCE_MIN_PROGRAMS, 0], ids=["reduce-grid-wide", "reduce-heads-merged"])
@pytest.mark.parametrize("programs_per_head", [1, 3, 5, 40])
@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
@pytest.mark.parametrize("backend", SPLIT_KV)
def test_balanced_schedule_matches_reference(device, backend, cfg, programs_per_head, reduce_min_programs, monkeypatch):
    monkeypatch.setattr(reduce, "REDUCE_MIN_PROGRAMS", reduce_min_programs)  # a few rows; both reduce tiles
    kv, q, gqa, qlen, hs, bs, scales = cfg
    case = make_decode_case(
        RAGGED, num_heads=2 * gqa, num_kv_heads=2, head_size=hs, block_size=bs, kv_dtype=kv, q_dtype=q,
        max_qlen=qlen, scales=scales, strided_q=True, device=device,
    )  # fmt: skip
    skip_if_unsupported(backend, case)
    rows, num_heads, _ = case["Q"].shape
    full, scratch = _guarded_scratch(rows, num_heads, hs, case["max_seq_len"], device)
    call = build_call(**dict(case, exp_sums=scratch[0], max_logits=scratch[1], tmp_out=scratch[2]))
    call.out.fill_(float("nan"))

    SPLIT_KV[backend].launch(call, base.sm_count(call.key.device_type, call.key.device_index), PARTITION_SIZE, programs_per_head)

    for t in full:
        assert t[:, :, -1].isnan().all(), "a partial was written past the scratch callers allocate"
    if programs_per_head == 1:  # every sequence whole in one program: written out, no partials
        assert all(t.isnan().all() for t in full)
    ref = reference_paged_attention(**case)
    assert not call.out.isnan().any(), "unwritten (NaN-poisoned) output elements"
    tol = 3e-2 * (2 if kv.itemsize == 1 else 1)
    torch.testing.assert_close(call.out.float(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("lens", [[0, 0, 0], [3000], [1] * 40], ids=["all-empty", "one-sequence", "many-short"])
@pytest.mark.parametrize("backend", SPLIT_KV)
def test_balanced_schedule_edge_batches(device, backend, lens):
    case = make_decode_case(lens, num_heads=4, num_kv_heads=1, head_size=64, device=device)
    skip_if_unsupported(backend, case)
    call = build_call(**dict(case, exp_sums=None, max_logits=None, tmp_out=None))
    call.out.fill_(float("nan"))
    SPLIT_KV[backend].launch(call, base.sm_count(call.key.device_type, call.key.device_index), PARTITION_SIZE, 7)
    torch.testing.assert_close(call.out.float(), reference_paged_attention(**case), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("new_tokens", [[2, 1], [0, 0]], ids=["last-short", "no-rows"])
def test_balanced_reduce_reads_no_padding_row(device, new_tokens, interpreter_bounds_check):
    """Rows past a sequence's new tokens are padding: the reduce reads no partial for them
    (the last sequence's lie past the scratch; with no rows at all, Q is empty)."""
    case = make_decode_case([255, 600], num_heads=4, num_kv_heads=2, head_size=64, block_size=32, max_qlen=2,
                            new_tokens=new_tokens, device=device)  # fmt: skip
    rows, num_heads, _ = case["Q"].shape
    parts = max_num_partitions(case["max_seq_len"])
    scratch = [torch.full((rows, num_heads, parts), float("nan"), device=device) for _ in range(2)]
    tmp_out = torch.full((rows, num_heads, parts, 64), float("nan"), device=device)
    call = build_call(**dict(case, exp_sums=scratch[0], max_logits=scratch[1], tmp_out=tmp_out))
    call.out.fill_(float("nan"))
    TRITON.launch(call, base.sm_count(call.key.device_type, call.key.device_index), PARTITION_SIZE, 3)
    torch.testing.assert_close(call.out.float(), reference_paged_attention(**case), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("backend", SPLIT_KV)
def test_public_call_runs_the_balanced_schedule_when_asked(device, backend, monkeypatch):
    monkeypatch.setenv("PA_HYBRID_SPLIT_SCHEDULE", "balanced")
    monkeypatch.setattr(base, "sm_count", lambda *_: 4)  # 4 programs per kv head, for 10 pages each
    case = make_decode_case([40, 600, 0, 2000], num_heads=8, num_kv_heads=2, max_qlen=2, device=device)
    skip_if_unsupported(backend, case)
    instance, ran = SPLIT_KV[backend], []
    launch = type(instance).launch
    monkeypatch.setattr(instance, "launch", lambda call, *schedule: ran.append(schedule) or launch(instance, call, *schedule))
    out = paged_attention_common(exp_sums=None, max_logits=None, tmp_out=None, backend=backend, **case)
    assert ran == [(4, PARTITION_SIZE, 4)]  # (num_sms, page, programs per head)
    torch.testing.assert_close(out.float(), reference_paged_attention(**case), rtol=3e-2, atol=3e-2)


def test_balanced_programs_per_head():
    assert base.balanced_programs_per_head(64, 8, 4096, 132, 2) == 33
    assert base.balanced_programs_per_head(4, 64, 4096, 16, 1) == 1
    assert base.balanced_programs_per_head(16, 8, 600, 132, 2) == 33  # 48 pages for 33 programs
    assert base.balanced_programs_per_head(8, 8, 600, 132, 2) == 0  # a program per page: static
    assert base.balanced_programs_per_head(64, 8, PARTITION_SIZE, 132, 2) == 0  # one partition: static
    assert base.balanced_programs_per_head(base.BALANCED_MAX_SEQS + 1, 8, 4096, 132, 2) == 0
    # auto: only once sequences x kv heads fill 3/4 of the grid (198 of 264 programs here)
    assert base.balanced_programs_per_head(16, 8, 4096, 132, 2, auto=True) == 0  # 128 < 198
    assert base.balanced_programs_per_head(25, 8, 4096, 132, 2, auto=True) == 33  # 200
    assert base.balanced_programs_per_head(256, 1, 4096, 132, 4, auto=True) == 0  # 256 < 396


def test_balanced_ctas_per_sm_fit_shared_memory():
    assert hip.balanced_ctas_per_sm(128, 16, 2, 2) == 2  # 102 KB each
    assert hip.balanced_ctas_per_sm(128, 16, 1, 4) == 4  # 55 KB each
    assert hip.balanced_ctas_per_sm(128, 32, 2, 2) == 1  # 135 KB: one fits
    assert hip.balanced_ctas_per_sm(256, 32, 1, 4) == 1
    for variant in hip.all_variants():  # the balanced entry each spec exports, within the SM
        spec = hip.kernel_spec(*variant, "sm_90a")
        if len(spec.entries) == 2:
            ctas = int(spec.entries[1].rsplit(",", 1)[1].rstrip(">"))
            cfg = hip.kernel_config(*variant[2:4], variant[1].itemsize, rows=variant[5])
            assert ctas * (cfg["smem_bytes"] + hip.SM90_SMEM_RESERVED_PER_CTA) <= hip.SM90_SMEM_PER_SM, (variant, ctas)


@pytest.mark.parametrize(
    "lens, setting, expected",
    [
        ([4096] * 32, "auto", 33),  # 256 sequences x kv heads >= 198: balanced
        ([2048] * 32, "auto", 0),  # ... but the static schedule walks 2048 tokens whole (no reduce)
        ([2048] * 16, "auto", 0),  # 128 < 198: static
        ([2048] * 16, "balanced", 33),
        ([512] * 32, "auto", 0),  # the static schedule writes out (no reduce): static
        ([512] * 32, "balanced", 33),
        ([2048] * 32, "static", 0),
    ],
)
@pytest.mark.parametrize("backend", SPLIT_KV)
def test_which_calls_take_the_balanced_schedule(monkeypatch, backend, lens, setting, expected):
    """The choice on an H100/H200-sized GPU (132 SMs), 8 kv heads, 16-bit cache: the same
    for hip and Triton."""
    monkeypatch.setenv("PA_HYBRID_SPLIT_SCHEDULE", setting)
    split_kv = SPLIT_KV[backend]
    monkeypatch.setattr(split_kv, "offers_balanced", lambda call: True)  # (on NVIDIA GPUs)
    case = make_decode_case(lens, num_heads=32, num_kv_heads=8, head_size=128, device="cpu")
    call = build_call(**dict(case, exp_sums=None, max_logits=None, tmp_out=None))
    assert split_kv.balanced_programs(call, 132, split_kv.partition_size(call, 132)) == expected


@pytest.mark.parametrize("setting", ["auto", "balanced"])
@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.int8], ids=["fp8", "int8"])
@pytest.mark.parametrize("backend, balanced_programs", [("hip", 66), ("triton", 33)])
def test_auto_keeps_8bit_caches_static(monkeypatch, backend, balanced_programs, kv_dtype, setting):
    # 32 sequences x 8 kv heads of 4096 tokens: the 16-bit call that auto balances
    # (test_which_calls_take_the_balanced_schedule); hip fits 4 CTAs per SM of 8-bit caches
    monkeypatch.setenv("PA_HYBRID_SPLIT_SCHEDULE", setting)
    split_kv = SPLIT_KV[backend]
    monkeypatch.setattr(split_kv, "offers_balanced", lambda call: True)
    case = make_decode_case([4096] * 32, num_heads=32, num_kv_heads=8, kv_dtype=kv_dtype, scales="per_token", device="cpu")
    call = build_call(**dict(case, exp_sums=None, max_logits=None, tmp_out=None))
    expected = balanced_programs if setting == "balanced" else 0
    assert split_kv.balanced_programs(call, 132, split_kv.partition_size(call, 132)) == expected


@pytest.mark.parametrize("setting", [None, "auto", "static", "balanced", "fast"])
def test_split_schedule_setting(monkeypatch, setting):
    if setting is None:
        monkeypatch.delenv("PA_HYBRID_SPLIT_SCHEDULE", raising=False)
    else:
        monkeypatch.setenv("PA_HYBRID_SPLIT_SCHEDULE", setting)
    if setting == "fast":
        with pytest.raises(ValueError, match="PA_HYBRID_SPLIT_SCHEDULE: expected one of auto, static, balanced"):
            base.split_schedule()
    else:
        assert base.split_schedule() == (setting or "auto")


def test_pieces_fit_the_scratch_and_own_distinct_slots():
    """The schedule's arithmetic, as both kernels compute it, over random batches: every
    page has one owner, a sequence's pieces take slots 0..pieces-1 once each, and never
    more slots than the 256-token scratch has."""
    rng = random.Random()
    for _ in range(2000):
        max_seq_len = rng.randint(1, 5000)
        lens = [rng.choice([0, rng.randint(0, max_seq_len)]) for _ in range(rng.randint(1, 30))]
        programs = rng.randint(1, 300)
        pages = [-(-n // PARTITION_SIZE) for n in lens]
        per_program = max(-(-sum(pages) // programs), 1)
        first = 0
        for n in pages:
            owners = [page // per_program for page in range(first, first + n)]
            assert all(o < programs for o in owners)
            pieces = (first + n - 1) // per_program - first // per_program + 1 if n else 0
            slots = sorted({o - first // per_program for o in owners})
            assert slots == list(range(pieces))
            assert pieces <= max_num_partitions(max_seq_len)
            first += n


@pytest.mark.parametrize(
    "num_seqs, kv_heads, max_len, whole_max, max_partition, expected",
    [
        (256, 1, 2048, 1024, 1024, 1024),  # capped
        (256, 1, 2048, 2048, 1024, 2048),  # 256 programs >= 132: one per context, no stage 2
        (256, 1, 2048, 1024, 2048, 2048),  # the same through a longer cap
        (128, 1, 2048, 2048, 1024, 1024),  # 128 < 132: still split, so every SM gets one
        (128, 1, 2048, 1024, 2048, 1024),  # the same under a longer cap
        (64, 4, 1500, 2048, 1024, 2048),  # a ragged batch whose longest context fits
        (256, 1, 16384, 2048, 1024, 1024),  # longer contexts keep the cap (ragged batches, RESULTS 7)
        (256, 1, 16384, 1024, 2048, 2048),  # ... or a longer cap
        (16, 4, 32768, 1024, 2048, 2048),  # 64 x 16 programs: still >= 132 at 2048
        (2, 4, 32768, 1024, 2048, 1024),  # 8 x 16 programs at 2048 would leave SMs idle
        (32, 8, 512, 1024, 1024, 512),  # a short context fits the cap anyway
        (1, 1, 2048, 2048, 1024, 256),  # one sequence: split as finely as the scratch allows
    ],
)
def test_static_partition_size(num_seqs, kv_heads, max_len, whole_max, max_partition, expected):
    assert base.split_kv_partition_size(num_seqs, kv_heads, max_len, 132, 1, whole_max, max_partition) == expected


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
@pytest.mark.parametrize("backend", ["hip", "triton"])
def test_static_schedule_at_its_longest_partition(device, backend, cfg, monkeypatch):
    """The public call on a 4-SM device: partitions grow to the backend's cap (hip 2048,
    Triton 1024 tokens), so sequences at and around it are written whole or merged by the
    reduce from a scratch of 256-token slots."""
    monkeypatch.setenv("PA_HYBRID_SPLIT_SCHEDULE", "static")
    monkeypatch.setattr(base, "sm_count", lambda *_: 4)
    kv, q, gqa, qlen, hs, bs, scales = cfg
    lens = [0, 1, 1023, 1025, 2047, 2048, 2049, 4100]
    case = make_decode_case(
        lens, num_heads=2 * gqa, num_kv_heads=2, head_size=hs, block_size=bs, kv_dtype=kv, q_dtype=q,
        max_qlen=qlen, scales=scales, strided_q=True, device=device,
    )  # fmt: skip
    skip_if_unsupported(backend, case)
    instance, ran = {"hip": HIP, "triton": TRITON}[backend], []
    launch = type(instance).launch
    monkeypatch.setattr(instance, "launch", lambda call, *schedule: ran.append(schedule) or launch(instance, call, *schedule))
    rows, num_heads, _ = case["Q"].shape
    full, scratch = _guarded_scratch(rows, num_heads, hs, case["max_seq_len"], device)
    out = torch.full_like(case["Q"], float("nan"))
    paged_attention_common(exp_sums=scratch[0], max_logits=scratch[1], tmp_out=scratch[2], out_=out, backend=backend, **case)
    assert ran == [(4, instance.max_partition)]
    for t in full:
        assert t[:, :, -1].isnan().all(), "a partial was written past the scratch callers allocate"
    tol = 3e-2 * (2 if kv.itemsize == 1 else 1)
    torch.testing.assert_close(out.float(), reference_paged_attention(**case), rtol=tol, atol=tol)


def test_triton_and_hip_partition_caps():
    # a 2048-token context: both walk it whole once 64 x 4 programs fill the SMs
    case = make_decode_case([2048] * 64, num_heads=16, num_kv_heads=4, head_size=128, device="cpu")
    call = build_call(**dict(case, exp_sums=None, max_logits=None, tmp_out=None))
    assert TRITON.partition_size(call, 132) == 2048
    assert HIP.partition_size(call, 132) == 2048
    # longer contexts: hip splits them in 2048-token partitions, Triton in 1024
    case = make_decode_case([6000] * 64, num_heads=16, num_kv_heads=4, head_size=128, device="cpu")
    call = build_call(**dict(case, exp_sums=None, max_logits=None, tmp_out=None))
    assert TRITON.partition_size(call, 132) == 1024
    assert HIP.partition_size(call, 132) == 2048
