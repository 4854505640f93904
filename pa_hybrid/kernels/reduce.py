"""Split-KV stage 2: merge per-partition partial results into the output.

The partial format, written by every split-KV stage 1 of the package: for query
row ``r``, head ``h`` and partition ``p`` (tokens ``[P p, P (p + 1))`` of what the
row sees, ``P`` the partition size: 256, or a multiple of it when a stage 1 walks
longer stretches; the scratch is always sized for 256), with logits
``s_j = scale * q . k_j``:

* ``max_logits[r, h, p] = m_p = max_j s_j``
* ``exp_sums[r, h, p]   = l_p = sum_j exp(s_j - m_p)``
* ``tmp_out[r, h, p, :] = sum_j exp(s_j - m_p) v_j / l_p``

Only partitions ``p < ceil(visible / P)`` are read, where ``visible`` is the
number of tokens the row sees, so stage 1 need not write the others. The package's static
stage 1s write ``out`` themselves for a sequence that its first partition holds whole
(``0 < context_len <= P``) and no partials for it; the reduce, told so (``whole_written``),
leaves those rows alone. After a stage 1
under the balanced schedule (``common.balanced_schedule``) slot ``p`` holds a sequence's
``p``-th piece instead, of whatever length, and slots ``0 .. pieces - 1`` are read.

On Hopper the reduce is launched with programmatic dependent launch: it may start
while stage 1 finishes (the hip stage 1 allows it early), reads the lengths (and derives
the balanced schedule) meanwhile, and waits for stage 1 before it reads the partials,
which hides its launch and that first round trip behind stage 1's tail. Stage 1 itself
is a normal launch, so every kernel before it has finished by then.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import (
    check_dtype,
    check_last_dim_contiguous,
    check_positive_int,
    check_rank,
    check_shape,
    check_tensor,
)
from ..layouts import PARTITION_SIZE
from .common import balanced_schedule, dependent_launch_ok, visible_tokens


@triton.jit
def _split_kv_reduce_kernel(
    out_ptr,  # [rows, num_heads, head_size] (strided rows/heads)
    exp_sums_ptr,  # [rows, num_heads, max_partitions] fp32
    max_logits_ptr,  # same shape and strides as exp_sums
    tmp_out_ptr,  # [rows, num_heads, max_partitions, head_size]
    context_lens_ptr,  # [num_seqs] int32
    qo_indptr_ptr,  # [num_seqs + 1] int32, read only when MAX_QLEN > 1
    stride_out_row,
    stride_out_head,
    stride_es_row,
    stride_es_head,
    stride_tmp_row,
    stride_tmp_head,
    stride_tmp_part,
    num_seqs,
    num_heads,
    max_seq_len,  # longer contexts count as this long (stage 1 cuts them there too)
    programs_per_head,  # BALANCED: stage 1's programs per kv head
    HEAD_SIZE: tl.constexpr,
    PARTITION: tl.constexpr,
    HEADS: tl.constexpr,  # heads per program
    BLOCK_P: tl.constexpr,
    MAX_QLEN: tl.constexpr,
    BALANCED: tl.constexpr,  # stage 1 ran the schedule of common.balanced_schedule
    BLOCK_S: tl.constexpr,  # BALANCED: num_seqs padded to a power of 2
    WAIT_FOR_STAGE1: tl.constexpr,  # launched as a programmatic dependent of stage 1
    WHOLE_WRITTEN: tl.constexpr,  # static: stage 1 wrote out the sequences of one partition
):
    """out = sum_p w_p tmp_out_p / sum_p w_p with w_p = l_p exp(m_p - max_p m_p), the
    maximum taken as the partitions are read (an online softmax over partitions).

    One program per (sequence, HEADS heads, new-token index): the heads of a row have as many
    partials each, so they are merged together, and the lengths (and the balanced schedule)
    are read once for all of them. Rows that see no token get 0.
    Under the balanced schedule a sequence has as many partials as stage-1 programs
    shared its pages, and one that a single program held was written out already; so
    was one of a single partition under the static schedule with ``WHOLE_WRITTEN``.
    """
    seq = tl.program_id(0)
    head = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
    token = tl.program_id(2)
    context_len = tl.minimum(tl.maximum(tl.load(context_lens_ptr + seq), 0), max_seq_len)
    if MAX_QLEN > 1:
        first_row = tl.load(qo_indptr_ptr + seq)
        num_new = tl.load(qo_indptr_ptr + seq + 1) - first_row
        row = first_row + token
        row_valid = token < num_new
        visible = tl.where(row_valid, visible_tokens(context_len, num_new, token), 0)
    else:
        row = seq
        row_valid = True
        visible = context_len
    if BALANCED:
        page_ends, total_pages, pages_per_program = balanced_schedule(
            context_lens_ptr, num_seqs, max_seq_len, programs_per_head, PARTITION, BLOCK_S
        )
        seq_end_page = tl.sum(tl.where(tl.arange(0, BLOCK_S) == seq, page_ends, 0), axis=0)
        seq_pages = tl.cdiv(context_len, PARTITION)
        pieces = (seq_end_page - 1) // pages_per_program - (seq_end_page - seq_pages) // pages_per_program + 1
        pieces = tl.where(seq_pages == 0, 0, pieces)
        written = pieces == 1
    else:
        pieces = tl.cdiv(visible, PARTITION)
        # a sequence of one partition, which stage 1 wrote out (none without WHOLE_WRITTEN)
        written = (context_len > 0) & (context_len <= (PARTITION if WHOLE_WRITTEN else 0))
    # padding rows (token >= num_new) read nothing: their row may lie past the partials
    num_parts = tl.where(row_valid, tl.where(written, 0, pieces), 0)

    # Up to here the reads are of lengths that stage 1 only reads, and a normal launch (stage
    # 1) started only after whatever wrote them had finished: they overlap stage 1's tail.
    if WAIT_FOR_STAGE1:  # before the partials and out: stage 1 writes both
        tl.extra.cuda.gdc_wait()
    part = tl.arange(0, BLOCK_P)
    dims = tl.arange(0, HEAD_SIZE)
    head_ok = head < num_heads
    es_row = row.to(tl.int64) * stride_es_row + head * stride_es_head  # [HEADS]
    tmp_row = row.to(tl.int64) * stride_tmp_row + head * stride_tmp_head

    # one pass, rescaled per chunk of BLOCK_P partitions: a chunk's maxima, sums and partials
    # are loaded together (one memory round trip for up to BLOCK_P partitions, not two)
    acc = tl.zeros([HEADS, HEAD_SIZE], dtype=tl.float32)
    weight_sum = tl.zeros([HEADS], dtype=tl.float32)
    running_max = tl.full([HEADS], float("-inf"), dtype=tl.float32)
    for p0 in range(0, num_parts, BLOCK_P):
        valid = head_ok[:, None] & (p0 + part < num_parts)[None, :]  # [HEADS, BLOCK_P]
        es_offs = es_row[:, None] + (p0 + part)[None, :]
        m = tl.load(max_logits_ptr + es_offs, mask=valid, other=float("-inf"))
        l = tl.load(exp_sums_ptr + es_offs, mask=valid, other=0.0)
        tmp_offs = tmp_row[:, None, None] + (p0 + part)[None, :, None] * stride_tmp_part + dims[None, None, :]
        partial = tl.load(tmp_out_ptr + tmp_offs, mask=valid[:, :, None], other=0.0).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(m, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # no -inf - -inf
        rescale = tl.exp(running_max - shift)
        w = tl.where(valid, l * tl.exp(m - shift[:, None]), 0.0)
        acc = acc * rescale[:, None] + tl.sum(w[:, :, None] * partial, axis=1)
        weight_sum = weight_sum * rescale + tl.sum(w, axis=1)
        running_max = new_max

    # weight_sum >= 1 whenever the row sees a token (the largest partition contributes l >= 1)
    result = acc / tl.maximum(weight_sum, 1e-30)[:, None]
    out_offs = row.to(tl.int64) * stride_out_row + head[:, None] * stride_out_head + dims[None, :]
    # padding rows (token >= num_new) store nothing, nor do those stage 1 wrote
    dims_to_store = tl.where(written, 0, tl.where(row_valid, HEAD_SIZE, 0))
    store = head_ok[:, None] & (dims < dims_to_store)[None, :]
    tl.store(out_ptr + out_offs, result.to(out_ptr.dtype.element_ty), mask=store)


def split_kv_reduce(
    out, exp_sums, max_logits, tmp_out, context_lens, qo_indptr=None, max_qlen: int = 1, partition_size: int = PARTITION_SIZE
):
    """Merge split-KV partials into ``out`` (in place) and return it.

    ``out``: ``[rows, num_heads, head_size]`` (last dim contiguous);
    ``exp_sums``/``max_logits``: ``[rows, num_heads, max_partitions]`` fp32, same strides;
    ``tmp_out``: ``[rows, num_heads, max_partitions, head_size]`` bf16/fp16/fp32, last dim
    contiguous; ``context_lens``: ``[num_seqs]`` int32. With ``max_qlen > 1``,
    ``qo_indptr`` (``[num_seqs + 1]`` int32) maps sequences to rows; otherwise row = sequence.
    """
    check_reduce_args(out, exp_sums, max_logits, tmp_out, context_lens, qo_indptr, max_qlen)
    if not isinstance(partition_size, int) or partition_size <= 0 or partition_size % PARTITION_SIZE:
        raise ValueError(f"partition_size: expected a positive multiple of {PARTITION_SIZE}, got {partition_size!r}")
    # a context longer than the scratch holds counts as what it holds: no read past it
    longest = exp_sums.shape[2] * PARTITION_SIZE
    return launch_split_kv_reduce(
        out, exp_sums, max_logits, tmp_out, context_lens, qo_indptr, max_qlen, partition_size, longest
    )


REDUCE_HEADS = 4
"""The most heads one reduce program merges. Measured on the H100 against 1 and 16 behind
hip's and Triton's stage 1 (20 cases, RESULTS.md section 34): 4 lifted the one-kv-head mixed
batch from 67.0 to 73.6% of the floor (hip's balanced reduce reads the lengths once for 4
heads); 16 did as well on 256 sequences but lost up to 10% on 16 (16 programs in all)."""

REDUCE_MIN_PROGRAMS = 256
"""Heads are merged by ``REDUCE_HEADS`` only where the reduce's grid keeps at least this many
programs; fewer rows take a head per program. On few-sequence calls each program walks many
partials, so the grid's width is what hides their loads: behind hip on the H100 (RESULTS.md
section 35) 4 heads per program took 1.53x the time of one on qwen3-235b-tp4 1 x 32768 (4
programs against 16), 1.11x on 4 x 32768, 1.07x on llama3-8b 1 x 8192, and were even at 16
sequences (64-128 programs) and 1-3% faster at 256 (1024 and more)."""

REDUCE_TILE = 32
"""Partials (over all its heads) a program of several heads loads at once: as a 3D tile
(heads x partials x head_size) 16 x 4 x 128 took 255 registers and spilled on sm_90a at 4
warps, 184-194 at 8; 16 x 2 x 128 takes 117-121 at 8. One head alone loads up to 64."""


def reduce_tile(
    num_heads: int, rows: int, scratch_partitions: int, partition_size: int, programs_per_head: int = 0
) -> tuple:
    """(``HEADS``, ``BLOCK_P``): heads per program and partials per head loaded at once, for
    ``rows`` query rows (``REDUCE_HEADS`` heads where that leaves ``REDUCE_MIN_PROGRAMS``).
    ``BLOCK_P``: as many as a row can have, at most ``REDUCE_TILE // HEADS`` (64 for one
    head). The scratch holds ``scratch_partitions`` 256-token partitions; a static stage 1
    with longer ones fills only a share of it, a balanced one (``programs_per_head > 0``) at
    most one piece per program. Sized by the scratch instead, the chunk cost 148 of 841 us on
    a ragged batch of up to 16384 tokens in 1024-token partitions (64 loaded for 16; H100,
    RESULTS 30)."""
    if programs_per_head:
        partials = min(scratch_partitions, programs_per_head)
    else:
        partials = triton.cdiv(scratch_partitions, partition_size // PARTITION_SIZE)
    heads = min(triton.next_power_of_2(num_heads), REDUCE_HEADS)
    if rows * triton.cdiv(num_heads, heads) < REDUCE_MIN_PROGRAMS:
        heads = 1
    return heads, min(triton.next_power_of_2(partials), 64 if heads == 1 else max(REDUCE_TILE // heads, 1))


def launch_split_kv_reduce(
    out, exp_sums, max_logits, tmp_out, context_lens, qo_indptr, max_qlen, partition_size, max_seq_len, *,
    programs_per_head=0, whole_written=False,
):
    """:func:`split_kv_reduce` without the checks, for backends whose call was validated
    already: contexts count as at most ``max_seq_len`` tokens, as in stage 1; with
    ``programs_per_head > 0``, after a stage 1 that ran the balanced schedule with those
    ``programs_per_head`` and pages of ``partition_size``; with ``whole_written``, after a
    static stage 1 that wrote ``out`` for the sequences of one partition."""
    num_seqs = context_lens.shape[0]
    balanced = programs_per_head > 0
    _, num_heads, head_size = out.shape
    heads, block_p = reduce_tile(num_heads, num_seqs * max_qlen, exp_sums.shape[2], partition_size, programs_per_head)
    dependent = dependent_launch_ok(out.device)
    _split_kv_reduce_kernel[(num_seqs, triton.cdiv(num_heads, heads), max_qlen)](
        out,
        exp_sums,
        max_logits,
        tmp_out,
        context_lens,
        qo_indptr if max_qlen > 1 else context_lens,
        out.stride(0),
        out.stride(1),
        exp_sums.stride(0),
        exp_sums.stride(1),
        tmp_out.stride(0),
        tmp_out.stride(1),
        tmp_out.stride(2),
        num_seqs if balanced else 0,
        num_heads,
        max_seq_len,
        programs_per_head,
        HEAD_SIZE=head_size,
        PARTITION=partition_size,
        HEADS=heads,
        BLOCK_P=block_p,
        MAX_QLEN=max_qlen,
        BALANCED=balanced,
        BLOCK_S=triton.next_power_of_2(num_seqs) if balanced else 1,
        WAIT_FOR_STAGE1=dependent,
        WHOLE_WRITTEN=whole_written and not balanced,
        num_warps=(4 if head_size <= 128 else 8) * (2 if heads > 1 else 1),  # see REDUCE_TILE
        **({"launch_pdl": True} if dependent else {}),
    )
    return out


def check_reduce_args(out, exp_sums, max_logits, tmp_out, context_lens, qo_indptr, max_qlen):
    check_tensor(qo_indptr, "qo_indptr", optional=True)
    check_positive_int(max_qlen, "max_qlen")
    check_rank(out, 3, "out", "[rows, num_heads, head_size]")
    rows, num_heads, head_size = out.shape
    check_rank(exp_sums, 3, "exp_sums", "[rows, num_heads, max_partitions]")
    check_dtype(exp_sums, torch.float32, "exp_sums")
    check_dtype(max_logits, torch.float32, "max_logits")
    parts = exp_sums.shape[2]
    check_shape(exp_sums, (rows, num_heads, parts), "exp_sums", "[rows, num_heads, max_partitions]")
    check_shape(max_logits, (rows, num_heads, parts), "max_logits", "(the shape of exp_sums)")
    if max_logits.stride() != exp_sums.stride():
        raise ValueError(f"max_logits: expected the strides of exp_sums {exp_sums.stride()}, got {max_logits.stride()}")
    if exp_sums.stride(2) != 1:
        raise ValueError(f"exp_sums: the partition dim must be contiguous, got strides {exp_sums.stride()}")
    check_shape(tmp_out, (rows, num_heads, parts, head_size), "tmp_out", "[rows, num_heads, max_partitions, head_size]")
    check_dtype(tmp_out, (torch.float32, torch.bfloat16, torch.float16), "tmp_out")
    check_last_dim_contiguous(tmp_out, "tmp_out")
    check_last_dim_contiguous(out, "out")
    check_rank(context_lens, 1, "context_lens", "[num_seqs]")
    check_dtype(context_lens, torch.int32, "context_lens")
    if max_qlen > 1:
        if qo_indptr is None:
            raise ValueError("qo_indptr: required with max_qlen > 1 ([num_seqs + 1] int32 row offsets)")
        check_dtype(qo_indptr, torch.int32, "qo_indptr")
        check_shape(qo_indptr, (context_lens.shape[0] + 1,), "qo_indptr", "[num_seqs + 1]")
    elif rows != context_lens.shape[0]:
        raise ValueError(f"out: expected {context_lens.shape[0]} rows (one per sequence), got {rows}")
    for name, t in (("exp_sums", exp_sums), ("max_logits", max_logits), ("tmp_out", tmp_out), ("context_lens", context_lens)):
        if t.device != out.device:
            raise ValueError(f"{name}: expected a tensor on {out.device} (the device of out), got {t.device}")
