"""Split-KV paged decode, stage 1, in Triton (the portable backend's kernel).

One program per (partition of 256 tokens or a multiple, kv head, sequence) serves
every query row of the kv head's GQA group (and every new token when ``max_qlen > 1``):
the rows ``m = i * GQA + g`` (new token ``i``, group member ``g``) form the M dim of
``tl.dot`` tiles, padded to 16, so K and V are read once per group (a group of more than
``MAX_ROWS`` rows is split over programs of ``MAX_ROWS`` rows, each reading them). The loop over the
partition walks ``BLOCK_N`` tokens at a time (several cache blocks), with an online
softmax in base 2: whole tiles first, which load without masks so that Triton pipelines
them (16-byte ``cp.async`` copies of the next tile's K and V in flight during a tile,
its block ids read a tile ahead), then the ragged end as one masked tile. It writes the
partial format of ``kernels/reduce.py``, or ``out`` directly for a sequence that one
partition holds whole (and for all, with no stage 2, when one partition covers every
context).

8-bit caches are widened to the query dtype (exact for e4m3 and int8) and their
scales applied in fp32: a per-token K scale multiplies its logit column, a
per-token V scale folds into the probabilities before P @ V (the row sum keeps the
unscaled probabilities), per-tensor scales fold into the softmax scale and the
final normalization.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    balanced_schedule,
    dot_dtype,
    k_tile_offset,
    nvidia_device,
    shared_memory_per_program,
    v_tile_offset,
    visible_tokens,
    warp_size_of,
)

LOG2E = 1.4426950408889634

SCALE_NONE, SCALE_PER_TENSOR, SCALE_PER_TOKEN = 0, 1, 2
MAX_ROWS = 64
"""Query rows one program serves at most: the largest tile the 4-warp programs were measured with
(GQA 16 x 4 new tokens); larger groups (MQA models, long speculative drafts) take several programs."""
# per-token V scales with fp16 dots (_decode_tile): the first unit, and how far past it a
# tile's V scales may go before the unit moves
V_UNIT_START = tl.constexpr(2.0**-126)
V_UNIT_HEADROOM = tl.constexpr(256.0)


@triton.jit
def _load(ptrs, mask, MASKED: tl.constexpr):
    """A load of the K/V stream (tiles and their per-token scales): ``tl.load`` with
    ``mask`` (0 where it is off) only when the tile has a ragged end. Every cache byte is
    read once per call, so its L2 lines are evicted first: the stream then does not push
    out what other kernels left in L2 (dirty lines, whose write-back would share DRAM with
    it)."""
    if MASKED:
        return tl.load(ptrs, mask=mask, other=0.0, eviction_policy="evict_first")
    else:
        return tl.load(ptrs, eviction_policy="evict_first")


@triton.jit
def _widen(x, DOT_DTYPE: tl.constexpr, FP8_VIA_FP32: tl.constexpr):
    """Cache values as ``DOT_DTYPE`` (exact). On NVIDIA GPUs e4m3 -> bf16 goes through fp32:
    converted directly, Triton widens each element on its own on sm_90's slow conversion unit
    (F2F); through fp32 it is one packed e4m3x2 -> f16x2, two f16 -> f32 and one packed
    f32x2 -> bf16x2 per pair, none of them on that unit. (On gfx942 the detour only added
    registers: up to 212 VGPRs, and a spill under Triton 3.9.)"""
    if FP8_VIA_FP32 and x.dtype.is_fp8() and DOT_DTYPE == tl.bfloat16:
        return x.to(tl.float32).to(DOT_DTYPE)
    return x.to(DOT_DTYPE)


@triton.jit
def _tile_block_ids(block_ids_ptr, start, end, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """The cache block of each token of the tile at ``start`` (block 0 past ``end``'s block)."""
    token = start + tl.arange(0, BLOCK_N)
    block_ok = token // BLOCK_SIZE < tl.cdiv(end, BLOCK_SIZE)
    block_id = tl.load(block_ids_ptr + token // BLOCK_SIZE, mask=block_ok, other=0)
    # runs of BLOCK_SIZE tokens share one id: the hint lets X-token runs of V count as contiguous
    return tl.max_constancy(block_id.to(tl.int64), BLOCK_SIZE)


@triton.jit
def _decode_tile(
    q,  # [M, HEAD_SIZE] in DOT_DTYPE
    acc,
    row_max,
    row_sum,
    v_unit,  # per-token V scales with fp16 dots: the V scale acc is counted in (returned moved)
    start,
    block_id,  # [BLOCK_N] int64: each token's cache block
    k_head_ptr,  # K + kv_head * stride_k_head
    v_head_ptr,
    k_scale_head_ptr,  # per-token scales + kv_head * stride_scale_head
    v_scale_head_ptr,
    stride_k_block,
    stride_v_block,
    stride_scale_block,
    end,  # first token this program does not own
    visible,  # [M] tokens each row sees
    qk_scale,  # softmax scale * log2(e) (* per-tensor K scale)
    HEAD_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    X: tl.constexpr,
    SCALES: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    FP8_VIA_FP32: tl.constexpr,
    MASKED: tl.constexpr,  # the tile may run past ``end``; else every token is before it
):
    """Online-softmax update with tokens [start, start + BLOCK_N); ``start`` is block aligned.

    Per-token V scales with fp16 dots: weights p * v_scale under 2^-14 would be fp16
    subnormals (bits lost for V scales that small), so the weights are p * v_scale / v_unit,
    and acc counts in v_unit. It starts at 2^-126 and moves up to a tile's largest V scale
    whenever that is more than V_UNIT_HEADROOM times it (so first at the program's first
    tile, unless its scales are all 0): no weight passes 256 (fp16 ends at 65504), whatever
    the scales.

    Unmasked tiles load with no mask at all: that is what lets Triton's pipeliner turn the
    K and V loads into 16-byte ``cp.async`` copies (a mask that varies within a 16-byte
    run of V's tokens splits its loads into single elements). A masked tile reads whole
    cache blocks (the block holding token ``end - 1`` is allocated) and zeroes V past
    ``end`` after the load: stale values may be NaN, and 0 * NaN is NaN."""
    n = tl.arange(0, BLOCK_N)
    dim = tl.arange(0, HEAD_SIZE)
    token = start + n
    token_ok = token < end
    block_ok = token // BLOCK_SIZE < tl.cdiv(end, BLOCK_SIZE)
    in_block = n % BLOCK_SIZE

    # K as [BLOCK_N, HEAD_SIZE]: X dims of a token are 16 contiguous bytes
    k_offs = block_id[:, None] * stride_k_block + k_tile_offset(in_block[:, None], dim[None, :], BLOCK_SIZE, X)
    k = _load(k_head_ptr + k_offs, token_ok[:, None], MASKED)
    s = tl.dot(q, tl.trans(_widen(k, DOT_DTYPE, FP8_VIA_FP32)))  # [M, BLOCK_N] fp32
    if SCALES == 2:
        s = s * _load(k_scale_head_ptr + block_id * stride_scale_block + in_block, token_ok, MASKED)[None, :]
    s = s * qk_scale
    s = tl.where(token[None, :] < visible[:, None], s, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(s, axis=1))
    # rows that have seen nothing yet keep -inf; shift by 0 so exp2 gives 0, not NaN
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    p = tl.exp2(s - shift[:, None])
    alpha = tl.exp2(row_max - shift)
    row_sum = row_sum * alpha + tl.sum(p, axis=1)

    # V as [HEAD_SIZE, BLOCK_N]: X tokens of a dim are 16 contiguous bytes
    v_offs = block_id[None, :] * stride_v_block + v_tile_offset(n[None, :], dim[:, None], HEAD_SIZE, BLOCK_SIZE, X)
    v_t = _widen(_load(v_head_ptr + v_offs, block_ok[None, :], MASKED), DOT_DTYPE, FP8_VIA_FP32)
    if MASKED:
        v_t = tl.where(token_ok[None, :], v_t, 0.0)
    if SCALES == 2:
        v_scale = _load(v_scale_head_ptr + block_id * stride_scale_block + in_block, token_ok, MASKED)
        if DOT_DTYPE == tl.float16:
            largest = tl.max(v_scale, axis=0)
            new_unit = tl.where(largest > v_unit * V_UNIT_HEADROOM, largest, v_unit)
            alpha = alpha * (v_unit / new_unit)  # acc into the new unit
            v_unit = new_unit
            v_scale = v_scale / v_unit
        p = p * v_scale[None, :]
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), tl.trans(v_t))
    return acc, new_max, row_sum, v_unit


@triton.jit
def _decode_span(
    out_ptr,
    exp_sums_ptr,
    max_logits_ptr,
    tmp_out_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    k_scale_ptr,
    v_scale_ptr,
    block_tables_ptr,
    qo_indptr_ptr,
    seq,
    kv_head,
    first_m,  # the program's first group row (0 unless the group takes several programs)
    context_len,  # clamped to max_seq_len
    start,  # the span: tokens [start, end) of the sequence, start a multiple of BLOCK_N
    end,
    part,  # its slot in the partials
    whole,  # the span holds the sequence whole: it writes out, no partials
    sm_scale_log2,
    stride_q_row,
    stride_q_head,
    stride_out_row,
    stride_out_head,
    stride_es_row,
    stride_es_head,
    stride_tmp_row,
    stride_tmp_head,
    stride_tmp_part,
    stride_k_block,
    stride_k_head,
    stride_v_block,
    stride_v_head,
    stride_scale_block,
    stride_scale_head,
    stride_bt_seq,
    GQA: tl.constexpr,
    MAX_QLEN: tl.constexpr,
    M: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    X: tl.constexpr,
    SCALES: tl.constexpr,
    WRITE_OUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    FP8_VIA_FP32: tl.constexpr,
):
    """One (sequence, kv head) span of stage 1: every query row of the group over tokens
    ``[start, end)``, written to ``out`` (``whole``, or ``WRITE_OUT``) or as partial ``part``."""
    m_idx = first_m + tl.arange(0, M)
    new_tok = m_idx // GQA
    head = kv_head * GQA + m_idx % GQA
    if MAX_QLEN > 1:
        first_row = tl.load(qo_indptr_ptr + seq)
        num_new = tl.load(qo_indptr_ptr + seq + 1) - first_row
        row_ok = new_tok < num_new
        visible = tl.where(row_ok, visible_tokens(context_len, num_new, new_tok), 0)
        row = first_row + new_tok
    else:
        row_ok = m_idx < GQA
        visible = tl.where(row_ok, context_len, 0)
        row = tl.zeros([M], dtype=tl.int32) + seq
    row = row.to(tl.int64)
    dim = tl.arange(0, HEAD_SIZE)
    q = tl.load(
        q_ptr + row[:, None] * stride_q_row + head[:, None] * stride_q_head + dim[None, :],
        mask=row_ok[:, None],
        other=0.0,
    ).to(DOT_DTYPE)

    qk_scale = sm_scale_log2
    if SCALES == 1:
        qk_scale = qk_scale * tl.load(k_scale_ptr)
    k_head_ptr = k_ptr + kv_head.to(tl.int64) * stride_k_head
    v_head_ptr = v_ptr + kv_head.to(tl.int64) * stride_v_head
    k_scale_head_ptr = k_scale_ptr + kv_head * stride_scale_head
    v_scale_head_ptr = v_scale_ptr + kv_head * stride_scale_head
    block_ids_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq

    acc = tl.zeros([M, HEAD_SIZE], dtype=tl.float32)
    row_max = tl.full([M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([M], dtype=tl.float32)
    # whole tiles first, without masks (so that they pipeline), then the ragged end
    whole_end = start + (end - start) // BLOCK_N * BLOCK_N
    block_id = _tile_block_ids(block_ids_ptr, start, end, BLOCK_SIZE, BLOCK_N)
    v_unit = tl.full([], 1.0, tl.float32)
    if SCALES == 2 and DOT_DTYPE == tl.float16:  # see _decode_tile
        v_unit = tl.full([], V_UNIT_START, tl.float32)
    for tile_start in range(start, whole_end, BLOCK_N):
        # the next tile's block ids are read a tile ahead
        next_block_id = _tile_block_ids(block_ids_ptr, tile_start + BLOCK_N, end, BLOCK_SIZE, BLOCK_N)
        acc, row_max, row_sum, v_unit = _decode_tile(
            q, acc, row_max, row_sum, v_unit, tile_start,
            block_id, k_head_ptr, v_head_ptr, k_scale_head_ptr, v_scale_head_ptr,
            stride_k_block, stride_v_block, stride_scale_block,
            end, visible, qk_scale,
            HEAD_SIZE, BLOCK_SIZE, BLOCK_N, X, SCALES, DOT_DTYPE, FP8_VIA_FP32, False,
        )  # fmt: skip
        block_id = next_block_id
    # the ragged end as a plain branch: as a second loop, Triton pipelines it too, with its
    # own buffers (55-88 KB of shared memory instead of 39-70: 2 programs per SM, not 3)
    if whole_end < end:
        acc, row_max, row_sum, v_unit = _decode_tile(
            q, acc, row_max, row_sum, v_unit, whole_end,
            block_id, k_head_ptr, v_head_ptr, k_scale_head_ptr, v_scale_head_ptr,
            stride_k_block, stride_v_block, stride_scale_block,
            end, visible, qk_scale,
            HEAD_SIZE, BLOCK_SIZE, BLOCK_N, X, SCALES, DOT_DTYPE, FP8_VIA_FP32, True,
        )  # fmt: skip

    if SCALES == 1:
        acc = acc * tl.load(v_scale_ptr)
    if SCALES == 2 and DOT_DTYPE == tl.float16:
        acc = acc * v_unit
    # row_sum >= 1 for a row that saw a token; rows that saw none stay 0
    result = acc / tl.maximum(row_sum, 1e-30)[:, None]
    # a sequence that this span holds whole goes to out; the reduce skips it
    # (tl.where: the interpreter's stores reject a row mask `&` a scalar one)
    to_out = row_ok if WRITE_OUT else tl.where(whole, row_ok, False)
    if not WRITE_OUT:
        to_partials = tl.where(whole, False, row_ok)
        es_offs = row * stride_es_row + head * stride_es_head + part
        tl.store(exp_sums_ptr + es_offs, row_sum, mask=to_partials)
        # natural-log units, as the partial format says
        tl.store(max_logits_ptr + es_offs, row_max / 1.4426950408889634, mask=to_partials)
        t_offs = row[:, None] * stride_tmp_row + head[:, None] * stride_tmp_head + part * stride_tmp_part
        tl.store(tmp_out_ptr + t_offs + dim[None, :], result.to(tmp_out_ptr.dtype.element_ty), mask=to_partials[:, None])
    o_offs = row[:, None] * stride_out_row + head[:, None] * stride_out_head + dim[None, :]
    tl.store(out_ptr + o_offs, result.to(out_ptr.dtype.element_ty), mask=to_out[:, None])


@triton.jit
def _paged_decode_kernel(
    out_ptr,  # [rows, num_heads, HEAD_SIZE]
    exp_sums_ptr,  # [rows, num_heads, max_partitions] fp32
    max_logits_ptr,
    tmp_out_ptr,  # [rows, num_heads, max_partitions, HEAD_SIZE]
    q_ptr,  # [rows, num_heads, HEAD_SIZE], last dim contiguous
    k_ptr,  # [num_blocks, num_kv_heads, HEAD_SIZE // X, BLOCK_SIZE, X]
    v_ptr,  # [num_blocks, num_kv_heads, BLOCK_SIZE // X, HEAD_SIZE, X]
    k_scale_ptr,  # per-tensor [1] or per-token [num_blocks, num_kv_heads, BLOCK_SIZE] fp32
    v_scale_ptr,
    block_tables_ptr,  # [num_seqs, max_blocks] int32
    context_lens_ptr,  # [num_seqs] int32
    qo_indptr_ptr,  # [num_seqs + 1] int32, read only when MAX_QLEN > 1
    num_seqs,  # BALANCED only (0 otherwise: one compiled variant for every batch)
    programs_per_head,  # BALANCED only: programs per kv head (grid axis 0)
    max_seq_len,  # longer contexts count as this long: the table row and scratch cover no more
    sm_scale_log2,  # softmax scale * log2(e)
    stride_q_row,
    stride_q_head,
    stride_out_row,
    stride_out_head,
    stride_es_row,
    stride_es_head,
    stride_tmp_row,
    stride_tmp_head,
    stride_tmp_part,
    stride_k_block,
    stride_k_head,
    stride_v_block,
    stride_v_head,
    stride_scale_block,
    stride_scale_head,
    stride_bt_seq,
    GQA: tl.constexpr,
    MAX_QLEN: tl.constexpr,
    M: tl.constexpr,  # rows per program: MAX_QLEN * GQA padded to a power of 2 >= 16, at most MAX_ROWS
    ROW_CHUNKS: tl.constexpr,  # programs per group (grid axis 1: kv head * ROW_CHUNKS + chunk)
    HEAD_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    X: tl.constexpr,
    SCALES: tl.constexpr,  # SCALE_NONE / SCALE_PER_TENSOR / SCALE_PER_TOKEN
    PARTITION: tl.constexpr,  # tokens per partition, or per page of the balanced schedule
    WRITE_OUT: tl.constexpr,  # one partition covers every context: write out, skip stage 2
    BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # operand dtype of tl.dot (the query dtype on GPUs)
    FP8_VIA_FP32: tl.constexpr,  # widen e4m3 to bf16 through fp32 (NVIDIA GPUs, see _widen)
    BALANCED: tl.constexpr,  # the balanced schedule (common.balanced_schedule) instead of partitions
    BLOCK_S: tl.constexpr,  # BALANCED: num_seqs padded to a power of 2
):
    """Stage 1. Static schedule (grid: partitions, kv heads, sequences): program (part,
    kv_head, seq) walks tokens ``[part PARTITION, (part + 1) PARTITION)`` of its sequence
    and writes ``out`` when that is the whole context, else partial ``part``. Balanced
    schedule (grid: ``programs_per_head``, kv heads; as hip's): each program walks its share
    of the kv head's pages, one span per sequence it touches, and writes each as the
    sequence's partial ``program - first_program_of_the_sequence`` (or ``out``, when it holds
    the sequence whole); the reduce derives the same schedule. A group of more than ``M``
    rows takes ``ROW_CHUNKS`` programs on axis 1, each its ``M`` rows."""
    kv_head = tl.program_id(1) // ROW_CHUNKS
    first_m = tl.program_id(1) % ROW_CHUNKS * M
    if BALANCED:
        program = tl.program_id(0)
        page_ends, total_pages, pages_per_program = balanced_schedule(
            context_lens_ptr, num_seqs, max_seq_len, programs_per_head, PARTITION, BLOCK_S
        )
        page = program * pages_per_program
        last_page = tl.minimum(page + pages_per_program, total_pages)
        seq = tl.sum((page_ends <= page).to(tl.int32), axis=0)  # the sequence holding page `page`
        while page < last_page:
            end_page_of_seq = tl.sum(tl.where(tl.arange(0, BLOCK_S) == seq, page_ends, 0), axis=0)
            context_len = tl.minimum(tl.maximum(tl.load(context_lens_ptr + seq), 0), max_seq_len)
            first_page_of_seq = end_page_of_seq - tl.cdiv(context_len, PARTITION)
            pieces = (end_page_of_seq - 1) // pages_per_program - first_page_of_seq // pages_per_program + 1
            stop_page = tl.minimum(last_page, end_page_of_seq)
            start = (page - first_page_of_seq) * PARTITION
            end = tl.minimum((stop_page - first_page_of_seq) * PARTITION, context_len)
            if start < end:  # a sequence of no pages has nothing here: the reduce writes its zeros
                _decode_span(
                    out_ptr,
                    exp_sums_ptr,
                    max_logits_ptr,
                    tmp_out_ptr,
                    q_ptr,
                    k_ptr,
                    v_ptr,
                    k_scale_ptr,
                    v_scale_ptr,
                    block_tables_ptr,
                    qo_indptr_ptr,
                    seq,
                    kv_head,
                    first_m,
                    context_len,
                    start,
                    end,
                    program - first_page_of_seq // pages_per_program,
                    pieces == 1,
                    sm_scale_log2,
                    stride_q_row,
                    stride_q_head,
                    stride_out_row,
                    stride_out_head,
                    stride_es_row,
                    stride_es_head,
                    stride_tmp_row,
                    stride_tmp_head,
                    stride_tmp_part,
                    stride_k_block,
                    stride_k_head,
                    stride_v_block,
                    stride_v_head,
                    stride_scale_block,
                    stride_scale_head,
                    stride_bt_seq,
                    GQA,
                    MAX_QLEN,
                    M,
                    HEAD_SIZE,
                    BLOCK_SIZE,
                    X,
                    SCALES,
                    False,
                    BLOCK_N,
                    DOT_DTYPE,
                    FP8_VIA_FP32,
                )
            page = tl.maximum(stop_page, page)
            seq += 1
    else:
        part = tl.program_id(0)
        seq = tl.program_id(2)

        context_len = tl.minimum(tl.maximum(tl.load(context_lens_ptr + seq), 0), max_seq_len)
        start = part * PARTITION
        end = tl.minimum(start + PARTITION, context_len)
        if start < context_len:
            _decode_span(
                out_ptr,
                exp_sums_ptr,
                max_logits_ptr,
                tmp_out_ptr,
                q_ptr,
                k_ptr,
                v_ptr,
                k_scale_ptr,
                v_scale_ptr,
                block_tables_ptr,
                qo_indptr_ptr,
                seq,
                kv_head,
                first_m,
                context_len,
                start,
                end,
                part,
                context_len <= PARTITION,
                sm_scale_log2,
                stride_q_row,
                stride_q_head,
                stride_out_row,
                stride_out_head,
                stride_es_row,
                stride_es_head,
                stride_tmp_row,
                stride_tmp_head,
                stride_tmp_part,
                stride_k_block,
                stride_k_head,
                stride_v_block,
                stride_v_head,
                stride_scale_block,
                stride_scale_head,
                stride_bt_seq,
                GQA,
                MAX_QLEN,
                M,
                HEAD_SIZE,
                BLOCK_SIZE,
                X,
                SCALES,
                WRITE_OUT,
                BLOCK_N,
                DOT_DTYPE,
                FP8_VIA_FP32,
            )
        elif WRITE_OUT:
            # an empty context gives zeros; only partition 0 exists when WRITE_OUT
            m_idx = first_m + tl.arange(0, M)
            head = kv_head * GQA + m_idx % GQA
            if MAX_QLEN > 1:
                first_row = tl.load(qo_indptr_ptr + seq)
                num_new = tl.load(qo_indptr_ptr + seq + 1) - first_row
                row_ok = m_idx // GQA < num_new
                row = (first_row + m_idx // GQA).to(tl.int64)
            else:
                row_ok = m_idx < GQA
                row = tl.zeros([M], dtype=tl.int64) + seq
            dim = tl.arange(0, HEAD_SIZE)
            o_offs = row[:, None] * stride_out_row + head[:, None] * stride_out_head + dim[None, :]
            tl.store(out_ptr + o_offs, tl.zeros([M, HEAD_SIZE], dtype=out_ptr.dtype.element_ty), mask=row_ok[:, None])


SPARSE_GRID_SHARED_MEMORY = 144 * 1024
"""Shared memory a 16-bit stage 1 with three stages may take (sm_90a, Triton 3.6 and 3.9: up to
136 KB, two tiles' K and V in flight); devices with less keep one stage on sparse grids too."""


def decode_tile_config(
    head_size: int, block_size: int, kv_bytes: int, warp_size: int = 32, sparse_grid: bool = False, *, rows: int = 16
) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) for a cache of ``kv_bytes``-byte elements and
    ``rows`` query rows a program (``M``).

    32-lane GPUs: 128-token tiles at head size 128, 4 warps (the M = 16 query rows leave more
    idle). 8-bit caches: 3 stages, so the pipeliner keeps the next tile's K and V copies in
    flight while a tile is widened and computed. 16-bit caches: 1 stage (plain loads into
    registers). Timed on the H200 (RESULTS 24, geomean time over 21 grid cases against the
    kernel before 16-byte V loads): 16-bit 1.04x at 128x4x1, 1.08-1.16x with 2-3 stages or
    32-64-token tiles; fp8 / int8 0.74x / 0.81x at 128x4x3, 0.85x / 0.98x with one stage.
    What bounds the 16-bit tile (H100, Nsight Compute, RESULTS 35): 237 registers leave 2
    programs (8 warps) per SM, and most stalls are the stores of the loaded K and V into shared
    memory for the MMAs waiting on their loads; the pipelined tiles skip that trip only in
    part and stall on shared memory instead (7-15 points of the floor lower).
    ``sparse_grid`` (at most one program per two SMs: the call takes about one program's
    latency): 16-bit caches take 3 stages as well, so a program's tiles are all in flight
    at once (H100, RESULTS 28: 0.81-0.88x the time of one stage on the bf16 grid calls of
    2-64 programs; 1.0 at 128 programs, 1.18-1.25x at 256 and more).
    More rows (GQA x max_qlen): 32- and 64-row tiles of 128 tokens spill on sm_90a (8-296
    bytes), and yet tiles of 16 x 128 / rows tokens, which do not, took 1.05-1.15x their time
    on 16-bit caches and on 8-bit ones with 32 rows; only 8-bit caches with 64 rows gained
    from them, 32 tokens taking 0.82-0.96x the time (H100, RESULTS 48).

    Wave64 GPUs (AMD CDNA): 128-token tiles took up to 398 VGPRs with Triton 3.9 and 484
    with 3.6 (one wave per SIMD) and spilled in most 8-bit variants; quarter tiles in one
    stage spill under neither (gfx942). Not timed on an AMD GPU."""
    if warp_size == 32:
        tokens = 16384 // head_size if kv_bytes == 2 or rows < 64 else 16384 // head_size * 16 // rows
        return max(tokens, block_size), 4, 3 if kv_bytes == 1 or sparse_grid else 1
    return max(16 if head_size >= 256 else 32, block_size), 4, 1


def launch_paged_decode(
    out,
    exp_sums,
    max_logits,
    tmp_out,
    Q,
    K,
    V,
    k_scale,
    v_scale,
    scales_kind: int,
    block_tables,
    context_lens,
    qo_indptr,
    *,
    scale: float,
    max_qlen: int,
    max_seq_len: int,
    partition_size: int,
    head_size: int,
    block_size: int,
    x: int,
    gqa: int,
    num_sms: int,
    programs_per_head: int = 0,
):
    """Launch stage 1 with partitions of ``partition_size`` tokens (a multiple of 256);
    when one partition covers ``max_seq_len`` it writes ``out`` and no stage 2 is needed.
    Otherwise it writes ``out`` for the sequences that one partition holds whole and
    partials for the others: stage 2 is the reduce with ``whole_written``.
    ``num_sms``: the device's SMs (CUs), which pick the tile's pipeline depth. With
    ``programs_per_head``, the balanced schedule instead (pages of ``partition_size``):
    stage 2 is the reduce with the same ``programs_per_head``."""
    num_partitions = programs_per_head or triton.cdiv(max_seq_len, partition_size)
    num_seqs = context_lens.shape[0]
    num_kv_heads = K.shape[1]
    rows = min(max(16, triton.next_power_of_2(max_qlen * gqa)), MAX_ROWS)
    row_chunks = triton.cdiv(max_qlen * gqa, rows)
    sparse_grid = (
        2 * num_partitions * num_kv_heads * row_chunks * (1 if programs_per_head else num_seqs) <= num_sms
        and shared_memory_per_program(Q.device) >= SPARSE_GRID_SHARED_MEMORY
    )
    block_n, num_warps, num_stages = decode_tile_config(
        head_size, block_size, K.element_size(), warp_size_of(Q.device), sparse_grid, rows=rows
    )
    write_out = num_partitions == 1 and not programs_per_head
    # unused pointers still need a valid tensor
    k_scale = k_scale if k_scale is not None else context_lens
    v_scale = v_scale if v_scale is not None else context_lens
    scale_strides = (k_scale.stride(0), k_scale.stride(1)) if scales_kind == SCALE_PER_TOKEN else (0, 0)
    if write_out:
        es, tmp = context_lens, context_lens
        es_strides, tmp_strides = (0, 0), (0, 0, 0)
    else:
        es, tmp = exp_sums, tmp_out
        es_strides = (exp_sums.stride(0), exp_sums.stride(1))
        tmp_strides = (tmp_out.stride(0), tmp_out.stride(1), tmp_out.stride(2))
    pointers = (out, es, max_logits if not write_out else context_lens, tmp, Q, K, V, k_scale, v_scale, block_tables, context_lens)
    qo = qo_indptr if max_qlen > 1 else context_lens
    strides = (
        Q.stride(0), Q.stride(1), out.stride(0), out.stride(1), *es_strides, *tmp_strides,
        K.stride(0), K.stride(1), V.stride(0), V.stride(1), *scale_strides, block_tables.stride(0),
    )  # fmt: skip
    constexprs = dict(
        GQA=gqa, MAX_QLEN=max_qlen, M=rows, ROW_CHUNKS=row_chunks, HEAD_SIZE=head_size, BLOCK_SIZE=block_size, X=x, SCALES=scales_kind,
        PARTITION=partition_size, BLOCK_N=block_n, DOT_DTYPE=dot_dtype(Q.dtype, K.dtype), FP8_VIA_FP32=nvidia_device(Q.device),
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    balanced = programs_per_head > 0
    heads = num_kv_heads * row_chunks
    grid = (programs_per_head, heads) if balanced else (num_partitions, heads, num_seqs)
    _paged_decode_kernel[grid](
        *pointers, qo, num_seqs if balanced else 0, programs_per_head, max_seq_len, scale * LOG2E, *strides,
        WRITE_OUT=write_out, BALANCED=balanced, BLOCK_S=triton.next_power_of_2(num_seqs) if balanced else 1, **constexprs,
    )  # fmt: skip
