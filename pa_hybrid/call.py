"""One validated ``paged_attention_common`` call, as the dispatcher and backends see it.

``build_call`` checks every argument (type, dtype, rank, shape, device, strides)
from metadata only: it never reads device memory, so it neither synchronizes
nor breaks CUDA-graph capture. It returns a :class:`DecodeCall` whose ``key``
(:class:`CallKey`) holds everything that decides which kernel can and should
run; backends' ``supports`` and the selection policy read only the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ._checks import (
    check_device_match,
    check_dtype,
    check_last_dim_contiguous,
    check_no_overlap,
    check_positive_int,
    check_rank,
    check_shape,
    check_tensor,
    check_validate,
)
from .layouts import QUERY_DTYPES, TMP_OUT_DTYPES, is_8bit, max_num_partitions, resolve_kv_dtype, shuffled_geometry

SCALES_NONE, SCALES_PER_TENSOR, SCALES_PER_TOKEN = "none", "per_tensor", "per_token"
HIGH_PRECISION_LEVELS = (0, 1, 2)


class CallKey(NamedTuple):
    """The static description of a call: what capability checks and the policy read."""

    device_type: str
    device_index: int
    q_dtype: torch.dtype
    kv_dtype: torch.dtype
    head_size: int
    block_size: int
    gqa: int
    num_kv_heads: int
    max_qlen: int
    scales: str  # SCALES_NONE / SCALES_PER_TENSOR / SCALES_PER_TOKEN
    high_precision: int
    kernel_name: str | None
    concurrency: int  # sequences (with max_qlen > 1 too: their new tokens are rows of the same CTAs)
    max_seq_len: int
    aligned: bool = True  # K/V blocks 16-byte aligned, Q/out rows 4-byte aligned (see aligned_for_native)
    row_strides_suffice: bool = True  # see row_strides_suffice: no strides beyond rows and K's are needed

    @property
    def kv_is_8bit(self) -> bool:
        return is_8bit(self.kv_dtype)

    def __str__(self):
        kv = str(self.kv_dtype).replace("torch.", "")
        q = str(self.q_dtype).replace("torch.", "")
        return (
            f"q={q} kv={kv} head_size={self.head_size} block_size={self.block_size} gqa={self.gqa} "
            f"max_qlen={self.max_qlen} scales={self.scales} concurrency={self.concurrency} "
            f"max_seq_len={self.max_seq_len} on {self.device_type}"
        )


def _aligned(t: torch.Tensor, unit: int, dims: int) -> bool:
    size = t.element_size()
    return t.data_ptr() % unit == 0 and all(t.stride(d) * size % unit == 0 for d in range(dims))


def row_strides_suffice(Q, out, K, V, k_scale, v_scale, per_token: bool) -> bool:
    """Whether a kernel told only Q's row stride and K's block and head strides can address
    the call (aiter's asm kernels on ROCm take no others): Q's heads adjacent, ``out``
    dense, V with K's block and head strides, per-token scales dense."""
    return (
        (Q.shape[1] == 1 or Q.stride(1) == Q.shape[2])
        and out.is_contiguous()
        and V.stride()[:2] == K.stride()[:2]
        and (not per_token or (k_scale.is_contiguous() and v_scale.is_contiguous()))
    )


def aligned_for_native(Q, out, K, V) -> bool:
    """Whether the native kernels' wide accesses line up: 16-byte copies of K/V rows
    (block and head strides) and 4-byte accesses of Q/out pairs (row and head strides)."""
    return _aligned(K, 16, 2) and _aligned(V, 16, 2) and _aligned(Q, 4, 2) and _aligned(out, 4, 2)


@dataclass
class DecodeCall:
    key: CallKey
    Q: torch.Tensor  # [rows, num_heads, head_size], last dim contiguous
    K: torch.Tensor  # shuffled, viewed as the logical kv dtype
    V: torch.Tensor
    out: torch.Tensor  # like Q, last dim contiguous
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    qo_indptr: torch.Tensor | None  # set whenever max_qlen > 1
    scale: float
    k_scale: torch.Tensor | None  # the scales that define the result (see resolve_scales)
    v_scale: torch.Tensor | None
    exp_sums: torch.Tensor | None
    max_logits: torch.Tensor | None
    tmp_out: torch.Tensor | None
    num_partitions: int
    validate: str

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    def scratch(self):
        """``(exp_sums, max_logits, tmp_out)``: the caller's, or fresh ones (fp32) if none were given."""
        if self.exp_sums is None:
            rows, heads, dim = self.Q.shape
            shape = (rows, heads, self.num_partitions)
            self.exp_sums = torch.empty(shape, dtype=torch.float32, device=self.Q.device)
            self.max_logits = torch.empty(shape, dtype=torch.float32, device=self.Q.device)
            self.tmp_out = torch.empty(shape + (dim,), dtype=torch.float32, device=self.Q.device)
        return self.exp_sums, self.max_logits, self.tmp_out


def resolve_scales(kv_dtype, K_QScale_hip, V_QScale_hip, K_QScale_asm, V_QScale_asm):
    """``(kind, k_scale, v_scale)``: per-token scales define the result when given,
    else per-tensor ones; 16-bit caches ignore scales (engines pass 1.0 anyway)."""
    if not is_8bit(kv_dtype):
        return SCALES_NONE, None, None
    if (K_QScale_asm is None) != (V_QScale_asm is None):
        raise ValueError("K_QScale_asm/V_QScale_asm: give both per-token scales or neither")
    if (K_QScale_hip is None) != (V_QScale_hip is None):
        raise ValueError("K_QScale_hip/V_QScale_hip: give both per-tensor scales or neither")
    if K_QScale_asm is not None:
        return SCALES_PER_TOKEN, K_QScale_asm, V_QScale_asm
    if K_QScale_hip is not None:
        return SCALES_PER_TENSOR, K_QScale_hip, V_QScale_hip
    raise ValueError(
        f"K_QScale_asm/V_QScale_asm: an 8-bit ({kv_dtype}) cache needs dequant scales: per-token "
        "[num_blocks, num_kv_heads, block_size] fp32 (K_QScale_asm, V_QScale_asm) or per-tensor "
        "1-element fp32 (K_QScale_hip, V_QScale_hip)"
    )


def build_call(
    Q,
    K,
    V,
    exp_sums,
    max_logits,
    tmp_out,
    block_tables,
    context_lens,
    block_tables_stride0,
    scale,
    max_qlen=1,
    max_seq_len=1,
    K_QScale_hip=None,
    V_QScale_hip=None,
    K_QScale_asm=None,
    V_QScale_asm=None,
    out_=None,
    qo_indptr=None,
    high_precision=1,
    kernelName=None,
    kv_cache_dtype="auto",
    kv_cache_tensor_dtype=None,
    validate="shapes",
) -> DecodeCall:
    """Check the arguments of ``paged_attention_common`` and describe the call.

    ``out_`` is allocated (like Q, contiguous) when None. With ``validate="full"``
    the values of block_tables, context_lens and qo_indptr are checked too, which
    reads them back from the device (a synchronization).
    """
    check_validate(validate)
    check_rank(Q, 3, "Q", "[num_seqs or total_q_tokens, num_heads, head_size]")
    check_dtype(Q, QUERY_DTYPES, "Q")
    check_last_dim_contiguous(Q, "Q")
    check_tensor(K, "K")
    check_tensor(V, "V")
    check_device_match(K, Q, "K", "Q")
    if V.dtype != K.dtype:  # before both are viewed as the logical dtype, which would hide it
        raise TypeError(f"V: expected the dtype of K ({K.dtype}), got {V.dtype}")
    kv_dtype = resolve_kv_dtype(K.dtype, kv_cache_dtype, kv_cache_tensor_dtype)
    if K.dtype != kv_dtype:
        K, V = K.view(kv_dtype), V.view(kv_dtype)
    num_blocks, num_kv_heads, head_size, block_size, x = shuffled_geometry(K, V)
    rows, num_heads, q_head_size = Q.shape
    if num_heads == 0:
        raise ValueError(f"Q: expected at least one head, got shape {tuple(Q.shape)}")
    if q_head_size != head_size:
        raise ValueError(f"Q: expected head_size {head_size} (from K), got shape {tuple(Q.shape)}")
    if num_heads % num_kv_heads:
        raise ValueError(
            f"Q: num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads}, from K)"
        )

    check_rank(block_tables, 2, "block_tables", "[num_seqs, max_blocks_per_seq]")
    check_dtype(block_tables, torch.int32, "block_tables")
    check_device_match(block_tables, Q, "block_tables", "Q")
    check_rank(context_lens, 1, "context_lens", "[num_seqs]")
    check_dtype(context_lens, torch.int32, "context_lens")
    check_device_match(context_lens, Q, "context_lens", "Q")
    if not context_lens.is_contiguous():
        raise ValueError(f"context_lens: expected a contiguous tensor, got strides {context_lens.stride()}")
    num_seqs = context_lens.shape[0]
    if block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"block_tables: expected {num_seqs} rows (one per context_lens entry), got shape {tuple(block_tables.shape)}"
        )
    if block_tables.shape[1] > 1 and block_tables.stride(1) != 1:
        raise ValueError(f"block_tables: rows must be contiguous, got strides {block_tables.stride()}")
    check_positive_int(block_tables_stride0, "block_tables_stride0", allow_zero=True)
    if num_seqs > 1 and block_tables_stride0 != block_tables.stride(0):
        raise ValueError(
            f"block_tables_stride0: expected block_tables.stride(0) = {block_tables.stride(0)}, got {block_tables_stride0}"
        )
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a Python float (softmax scale), got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite softmax scale, got {scale}")

    check_positive_int(max_qlen, "max_qlen")
    check_positive_int(max_seq_len, "max_seq_len")
    covered = block_tables.shape[1] * block_size
    if max_seq_len > covered:
        raise ValueError(
            f"max_seq_len: {max_seq_len} tokens exceed what block_tables covers "
            f"({block_tables.shape[1]} blocks x block_size {block_size} = {covered})"
        )
    if max_qlen > 1:
        if qo_indptr is None:
            if rows != num_seqs * max_qlen:
                raise ValueError(
                    f"qo_indptr: required with max_qlen={max_qlen} unless every sequence has max_qlen new tokens "
                    f"(Q would have {num_seqs * max_qlen} rows, got {rows})"
                )
            qo_indptr = torch.arange(0, rows + 1, max_qlen, dtype=torch.int32, device=Q.device)
        check_rank(qo_indptr, 1, "qo_indptr", "[num_seqs + 1]")
        check_dtype(qo_indptr, torch.int32, "qo_indptr")
        check_shape(qo_indptr, (num_seqs + 1,), "qo_indptr", "[num_seqs + 1]")
        check_device_match(qo_indptr, Q, "qo_indptr", "Q")
        if not qo_indptr.is_contiguous():
            raise ValueError(f"qo_indptr: expected a contiguous tensor, got strides {qo_indptr.stride()}")
    else:
        if rows != num_seqs:
            raise ValueError(f"Q: expected {num_seqs} rows (one per sequence) with max_qlen=1, got shape {tuple(Q.shape)}")
        qo_indptr = None

    if high_precision is None:
        high_precision = 1
    if high_precision not in HIGH_PRECISION_LEVELS or isinstance(high_precision, bool):
        raise ValueError(f"high_precision: expected 0, 1 or 2, got {high_precision!r}")
    if kernelName is not None and not isinstance(kernelName, str):
        raise TypeError(f"kernelName: expected a str or None, got {type(kernelName).__name__}")

    scales, k_scale, v_scale = resolve_scales(kv_dtype, K_QScale_hip, V_QScale_hip, K_QScale_asm, V_QScale_asm)
    if scales == SCALES_PER_TOKEN:
        expected = (num_blocks, num_kv_heads, block_size)
        for name, t in (("K_QScale_asm", k_scale), ("V_QScale_asm", v_scale)):
            check_shape(t, expected, name, "[num_blocks, num_kv_heads, block_size]")
            check_dtype(t, torch.float32, name)
            check_device_match(t, Q, name, "Q")
            if t.stride(2) != 1:
                raise ValueError(f"{name}: the block_size dim must be contiguous, got strides {t.stride()}")
        if k_scale.stride() != v_scale.stride():
            raise ValueError(f"V_QScale_asm: expected the strides of K_QScale_asm {k_scale.stride()}, got {v_scale.stride()}")
    elif scales == SCALES_PER_TENSOR:
        for name, t in (("K_QScale_hip", k_scale), ("V_QScale_hip", v_scale)):
            check_tensor(t, name)
            if t.numel() != 1:
                raise ValueError(f"{name}: expected a 1-element fp32 tensor (per-tensor scale), got shape {tuple(t.shape)}")
            check_dtype(t, torch.float32, name)
            check_device_match(t, Q, name, "Q")

    if out_ is None:
        out = torch.empty(Q.shape, dtype=Q.dtype, device=Q.device)
    else:
        check_shape(out_, Q.shape, "out_", "(the shape of Q)")
        check_dtype(out_, Q.dtype, "out_")
        check_device_match(out_, Q, "out_", "Q")
        check_last_dim_contiguous(out_, "out_")
        out = out_

    num_partitions = max_num_partitions(max_seq_len)
    given = [t is not None for t in (exp_sums, max_logits, tmp_out)]
    if any(given) and not all(given):
        raise ValueError("exp_sums/max_logits/tmp_out: give all three split-KV scratch tensors or none")
    if all(given):
        _check_scratch(exp_sums, max_logits, tmp_out, rows, num_heads, head_size, num_partitions, Q)
        check_no_overlap({"out_": out, "exp_sums": exp_sums, "max_logits": max_logits, "tmp_out": tmp_out})
    elif out_ is not None:
        check_no_overlap({"out_": out})

    if validate == "full":
        _check_values(block_tables, context_lens, qo_indptr, num_blocks, block_size, max_seq_len, max_qlen, rows)

    key = CallKey(
        device_type=Q.device.type,
        device_index=Q.device.index if Q.device.index is not None else 0,
        q_dtype=Q.dtype,
        kv_dtype=kv_dtype,
        head_size=head_size,
        block_size=block_size,
        gqa=num_heads // num_kv_heads,
        num_kv_heads=num_kv_heads,
        max_qlen=max_qlen,
        scales=scales,
        high_precision=high_precision,
        kernel_name=kernelName,
        concurrency=num_seqs,
        max_seq_len=max_seq_len,
        aligned=aligned_for_native(Q, out, K, V),
        row_strides_suffice=row_strides_suffice(Q, out, K, V, k_scale, v_scale, scales == SCALES_PER_TOKEN),
    )
    return DecodeCall(
        key=key,
        Q=Q,
        K=K,
        V=V,
        out=out,
        block_tables=block_tables,
        context_lens=context_lens,
        qo_indptr=qo_indptr,
        scale=float(scale),
        k_scale=k_scale,
        v_scale=v_scale,
        exp_sums=exp_sums,
        max_logits=max_logits,
        tmp_out=tmp_out,
        num_partitions=num_partitions,
        validate=validate,
    )


def _check_scratch(exp_sums, max_logits, tmp_out, rows, num_heads, head_size, num_partitions, Q):
    for name, t in (("exp_sums", exp_sums), ("max_logits", max_logits)):
        check_rank(t, 3, name, "[rows, num_heads, max_num_partitions]")
        check_dtype(t, torch.float32, name)
        check_device_match(t, Q, name, "Q")
        if t.shape[0] != rows or t.shape[1] != num_heads or t.shape[2] < num_partitions:
            raise ValueError(
                f"{name}: expected shape ({rows}, {num_heads}, >= {num_partitions}) "
                f"(ceil(max_seq_len / 256) partitions), got {tuple(t.shape)}"
            )
        if t.stride(2) != 1:
            raise ValueError(f"{name}: the partition dim must be contiguous, got strides {t.stride()}")
    if exp_sums.shape != max_logits.shape or exp_sums.stride() != max_logits.stride():
        raise ValueError(
            f"max_logits: expected the shape and strides of exp_sums {tuple(exp_sums.shape)}/{exp_sums.stride()}, "
            f"got {tuple(max_logits.shape)}/{max_logits.stride()}"
        )
    check_rank(tmp_out, 4, "tmp_out", "[rows, num_heads, max_num_partitions, head_size]")
    check_dtype(tmp_out, TMP_OUT_DTYPES, "tmp_out")
    check_device_match(tmp_out, Q, "tmp_out", "Q")
    if tuple(tmp_out.shape) != (rows, num_heads, exp_sums.shape[2], head_size):
        raise ValueError(
            f"tmp_out: expected shape {(rows, num_heads, exp_sums.shape[2], head_size)} (matching exp_sums), "
            f"got {tuple(tmp_out.shape)}"
        )
    check_last_dim_contiguous(tmp_out, "tmp_out")


def _check_values(block_tables, context_lens, qo_indptr, num_blocks, block_size, max_seq_len, max_qlen, rows):
    """The opt-in device-data checks (``validate="full"``): one host round trip."""
    lens = context_lens.cpu()
    if bool((lens < 0).any()):
        raise ValueError(f"context_lens: negative lengths {lens[lens < 0].tolist()[:8]}")
    if lens.numel() and int(lens.max()) > max_seq_len:
        raise ValueError(f"context_lens: longest context {int(lens.max())} exceeds max_seq_len={max_seq_len}")
    table = block_tables.cpu()
    used = torch.arange(table.shape[1])[None, :] < ((lens + block_size - 1) // block_size)[:, None]
    ids = table[used]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_blocks):
        raise ValueError(
            f"block_tables: block ids used by the contexts must lie in [0, {num_blocks}), "
            f"found [{int(ids.min())}, {int(ids.max())}]"
        )
    if qo_indptr is not None:
        ptr = qo_indptr.cpu()
        n = ptr[1:] - ptr[:-1]
        if int(ptr[0]) != 0 or int(ptr[-1]) != rows or bool((n < 0).any()) or bool((n > max_qlen).any()):
            raise ValueError(
                f"qo_indptr: expected non-decreasing offsets from 0 to {rows} with at most max_qlen={max_qlen} "
                f"rows per sequence, got {ptr.tolist()[:16]}"
            )
