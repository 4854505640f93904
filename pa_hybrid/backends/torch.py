"""Plain-torch backend: gather K/V by block table, then ``scaled_dot_product_attention``.

The baseline the benchmark compares against (what an engine without a paged
kernel would write), and the last resort of "auto" for shapes no kernel covers
(any head size, block size, GQA ratio or qlen). Sequences are padded to
``max_seq_len`` and processed in chunks so the gathered copy stays under
``GATHER_BUDGET_BYTES``; the GQA group rides in SDPA's query-length dim, so K/V
are never repeated per query head. No host synchronization.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..call import SCALES_NONE, SCALES_PER_TOKEN, DecodeCall
from ..layouts import KV_DTYPES
from .base import Backend

GATHER_BUDGET_BYTES = 2 << 30


class TorchBackend(Backend):
    name = "torch"
    device_types = ("cuda", "cpu")
    kv_dtypes = KV_DTYPES

    def run(self, call: DecodeCall) -> None:
        key = call.key
        if call.Q.shape[0] == 0:  # no query row (max_qlen > 1 and no new token anywhere)
            return
        if call.K.shape[0] == 0:  # no cache block at all: every context must be empty
            call.out.zero_()
            return
        num_blocks = -(-key.max_seq_len // key.block_size)
        padded_len = num_blocks * key.block_size
        per_seq = 2 * key.num_kv_heads * padded_len * key.head_size * _compute_dtype(call).itemsize
        chunk = max(1, GATHER_BUDGET_BYTES // per_seq)
        if key.max_qlen > 1:
            rows = call.Q.shape[0]
            # rows past a sequence's new tokens land in a spare row, dropped at the end
            out = torch.empty((rows + 1,) + tuple(call.Q.shape[1:]), dtype=call.out.dtype, device=call.out.device)
        else:
            out = call.out
        for s0 in range(0, call.num_seqs, chunk):
            _attend_chunk(call, out, s0, min(call.num_seqs, s0 + chunk), num_blocks)
        if key.max_qlen > 1:
            call.out.copy_(out[:rows])


def _compute_dtype(call: DecodeCall) -> torch.dtype:
    """The query dtype, or fp32 where it cannot hold the cache's values: a 16-bit cache of the
    other 16-bit type (bf16 would drop 3 bits of an fp16 cache, fp16 the range of a bf16 one),
    and an 8-bit cache under fp16 queries (dequantized values may pass 65504, or be subnormal)."""
    kv, q = call.key.kv_dtype, call.Q.dtype
    if kv.itemsize == 2:
        return torch.float32 if kv != q else q
    return torch.float32 if q == torch.float16 else q


def _gather(call: DecodeCall, ids: torch.Tensor):
    """K and V of sequences whose block ids are ``ids`` ``[c, nb]``, as ``[c, kv_heads, nb * bs, head_size]``."""
    key = call.key
    c, nb = ids.shape
    length = nb * key.block_size
    dtype = _compute_dtype(call)
    # K[b, h, d // x, t, d % x] and V[b, h, t // x, d, t % x] -> [c, h, nb * bs, d]
    k = call.K[ids].permute(0, 2, 1, 4, 3, 5).reshape(c, key.num_kv_heads, length, key.head_size).to(dtype)
    v = call.V[ids].permute(0, 2, 1, 3, 5, 4).reshape(c, key.num_kv_heads, length, key.head_size).to(dtype)
    if key.scales == SCALES_PER_TOKEN:
        ks = call.k_scale[ids].permute(0, 2, 1, 3).reshape(c, key.num_kv_heads, length, 1)
        vs = call.v_scale[ids].permute(0, 2, 1, 3).reshape(c, key.num_kv_heads, length, 1)
        k, v = (k.float() * ks).to(dtype), (v.float() * vs).to(dtype)
    elif key.scales != SCALES_NONE:
        k, v = (k.float() * call.k_scale.reshape(())).to(dtype), (v.float() * call.v_scale.reshape(())).to(dtype)
    return k, v


def _attend_chunk(call: DecodeCall, out: torch.Tensor, s0: int, s1: int, num_blocks: int):
    key = call.key
    device = call.Q.device
    # as the kernels: a context counts as at most max_seq_len tokens (what the table row covers),
    # and table entries past it may hold anything, so they gather block 0 instead
    ctx = call.context_lens[s0:s1].long().clamp(0, key.max_seq_len)
    ids = call.block_tables[s0:s1, :num_blocks].long()
    used = torch.arange(num_blocks, device=device)[None, :] * key.block_size < ctx[:, None]
    k, v = _gather(call, ids.where(used, 0))
    c, length = s1 - s0, k.shape[2]
    # slots past a context hold whatever the engine left there (NaN included): zero them, since
    # a masked score still meets its K row and a zero weight still meets its V row
    inside = (torch.arange(length, device=device)[None, :] < ctx[:, None])[:, None, :, None]
    k, v = k.where(inside, 0.0), v.where(inside, 0.0)
    qlen, gqa, kvh, d = key.max_qlen, key.gqa, key.num_kv_heads, key.head_size
    if qlen > 1:
        first = call.qo_indptr[s0:s1].long()
        num_new = call.qo_indptr[s0 + 1 : s1 + 1].long() - first
        i = torch.arange(qlen, device=device)
        valid = i[None, :] < num_new[:, None]  # [c, qlen]
        rows = torch.where(valid, first[:, None] + i[None, :], call.Q.shape[0])
        q = call.Q[rows.clamp(max=call.Q.shape[0] - 1)]  # [c, qlen, heads, d]
        visible = torch.where(valid, ctx[:, None] - num_new[:, None] + i[None, :] + 1, 0)
    else:
        rows = None
        q = call.Q[s0:s1, None]  # [c, 1, heads, d]
        visible = ctx[:, None]
    # the group and the new tokens share SDPA's query dim: [c, kv_heads, qlen * gqa, d]
    q = q.to(k.dtype).reshape(c, qlen, kvh, gqa, d).permute(0, 2, 1, 3, 4).reshape(c, kvh, qlen * gqa, d)
    visible = visible.repeat_interleave(gqa, dim=1)  # [c, qlen * gqa]
    mask = torch.arange(length, device=device)[None, None, :] < visible[:, :, None]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=call.scale)
    o = torch.where(visible[:, None, :, None] > 0, o, 0.0)  # rows that see nothing: 0, not NaN
    o = o.reshape(c, kvh, qlen, gqa, d).permute(0, 2, 1, 3, 4).reshape(c, qlen, kvh * gqa, d)
    if rows is None:
        out[s0:s1] = o[:, 0]
    else:
        out[rows.reshape(-1)] = o.reshape(c * qlen, kvh * gqa, d).to(out.dtype)  # (index_put does not cast)


BACKEND = TorchBackend()
