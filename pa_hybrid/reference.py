"""The float32 torch oracle of ``paged_attention_common`` (CPU or GPU).

Slow on purpose: one sequence at a time, the cache gathered and dequantized
into plain ``[tokens, kv_heads, head_size]`` tensors, softmax in
``compute_dtype``. Every kernel of the package is tested against it; it is
itself tested against a per-(row, head) loop over unpaged K/V
(``tests/test_reference.py``).
"""

from __future__ import annotations

import torch

from .layouts import is_8bit, resolve_kv_dtype, shuffled_geometry


def gather_sequence_kv(K, V, block_ids, context_len, *, k_scale=None, v_scale=None, dtype=torch.float32):
    """Dequantized ``(k, v)`` of one sequence, each ``[context_len, num_kv_heads, head_size]``.

    ``block_ids`` is the sequence's row of the block table (at least
    ``ceil(context_len / block_size)`` entries); ``k_scale``/``v_scale`` are either
    per-token ``[num_blocks, num_kv_heads, block_size]`` or one-element tensors.
    """
    num_blocks, num_kv_heads, head_size, block_size, x = shuffled_geometry(K, V)
    n = -(-context_len // block_size)
    ids = block_ids[:n].long()
    # K[b, h, d // x, t, d % x] -> [b, t, h, d]; V[b, h, t // x, d, t % x] -> [b, t, h, d]
    k = K[ids].permute(0, 3, 1, 2, 4).reshape(n * block_size, num_kv_heads, head_size)[:context_len]
    v = V[ids].permute(0, 2, 4, 1, 3).reshape(n * block_size, num_kv_heads, head_size)[:context_len]
    k, v = k.to(dtype), v.to(dtype)
    for t, scale in ((k, k_scale), (v, v_scale)):
        if scale is None:
            continue
        if scale.dim() == 3:  # per token
            s = scale[ids].permute(0, 2, 1).reshape(n * block_size, num_kv_heads)[:context_len]
            t.mul_(s.to(dtype)[:, :, None])
        else:
            t.mul_(scale.reshape(()).to(dtype))
    return k, v


def reference_paged_attention(
    Q,
    K,
    V,
    exp_sums=None,
    max_logits=None,
    tmp_out=None,
    block_tables=None,
    context_lens=None,
    block_tables_stride0=None,
    scale=None,
    max_qlen: int = 1,
    max_seq_len: int = 1,
    K_QScale_hip=None,
    V_QScale_hip=None,
    K_QScale_asm=None,
    V_QScale_asm=None,
    out_=None,
    qo_indptr=None,
    high_precision: int = 1,
    kernelName=None,
    kv_cache_dtype: str = "auto",
    kv_cache_tensor_dtype=None,
    backend=None,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Attention output ``[Q.shape[0], num_heads, head_size]`` in ``compute_dtype``.

    Takes the arguments of ``paged_attention_common`` (scratch, ``max_seq_len``,
    ``high_precision``, ``kernelName`` and ``backend`` do not change the math and
    are ignored). Per-token scales, when given, define the dequantization;
    otherwise the per-tensor ones; 16-bit caches ignore scales. With
    ``max_qlen > 1`` row ``qo_indptr[s] + i`` of a sequence with ``n`` new tokens
    sees the first ``context_lens[s] - n + i + 1`` tokens (uniform ``max_qlen``
    rows per sequence when ``qo_indptr`` is None). A row that sees no token is 0.
    If ``out_`` is given the result is also written into it.
    """
    if scale is None or block_tables is None or context_lens is None:
        raise TypeError("reference_paged_attention: block_tables, context_lens and scale are required")
    kv_dtype = resolve_kv_dtype(K.dtype, kv_cache_dtype, kv_cache_tensor_dtype)
    K, V = K.view(kv_dtype), V.view(kv_dtype)
    k_scale = v_scale = None
    if is_8bit(kv_dtype):
        k_scale = K_QScale_asm if K_QScale_asm is not None else K_QScale_hip
        v_scale = V_QScale_asm if V_QScale_asm is not None else V_QScale_hip
    num_seqs = context_lens.shape[0]
    num_rows, num_heads, head_size = Q.shape
    num_kv_heads = K.shape[1]
    gqa = num_heads // num_kv_heads
    lens = context_lens.tolist()
    if max_qlen > 1:
        indptr = (qo_indptr.tolist() if qo_indptr is not None else [s * max_qlen for s in range(num_seqs + 1)])
    else:
        indptr = list(range(num_seqs + 1))
    out = torch.zeros(num_rows, num_heads, head_size, dtype=compute_dtype, device=Q.device)
    for s in range(num_seqs):
        r0, r1 = indptr[s], indptr[s + 1]
        n_new, ctx = r1 - r0, lens[s]
        if n_new <= 0 or ctx <= 0:
            continue
        k, v = gather_sequence_kv(K, V, block_tables[s], ctx, k_scale=k_scale, v_scale=v_scale, dtype=compute_dtype)
        q = Q[r0:r1].to(compute_dtype).reshape(n_new, num_kv_heads, gqa, head_size)
        logits = torch.einsum("nkgd,tkd->nkgt", q, k) * scale
        # causal among the new tokens: row i sees tokens [0, ctx - n_new + i + 1)
        visible = ctx - n_new + 1 + torch.arange(n_new, device=Q.device)
        mask = torch.arange(ctx, device=Q.device)[None, :] < visible[:, None]
        logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
        p = torch.softmax(logits, dim=-1).nan_to_num_(0.0)  # rows that see nothing -> 0
        o = torch.einsum("nkgt,tkd->nkgd", p, v)
        out[r0:r1] = o.reshape(n_new, num_heads, head_size)
    if out_ is not None:
        out_.copy_(out)
    return out
