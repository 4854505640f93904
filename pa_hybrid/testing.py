"""Random decode problems in the shuffled layout, for tests, the benchmark and tuning.

``make_decode_case`` returns the keyword arguments of ``paged_attention_common``
(without scratch), built from fresh random data: random K/V values (8-bit caches
get random stored values and random positive per-token scales), a block table
that scatters each sequence over random, non-contiguous blocks, and Q as a
strided view of a wider tensor when asked (as when Q is a slice of a fused QKV).
"""

from __future__ import annotations

import math

import torch

from .layouts import is_8bit, k_cache_shape, scale_shape, v_cache_shape

FP8_MAX = 448.0


def random_cache_values(shape, dtype, generator, device):
    """Random stored values of a cache tensor: N(0, 1) for 16-bit; for 8-bit the
    whole code range (fp8 up to +-448 through N(0, 64), int8 uniform in [-127, 127])."""
    if dtype == torch.int8:
        return torch.randint(-127, 128, shape, generator=generator, device=device, dtype=torch.int8)
    std = 64.0 if is_8bit(dtype) else 1.0
    v = torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * std
    if is_8bit(dtype):
        v = v.clamp_(-FP8_MAX, FP8_MAX)
    return v.to(dtype)


def make_decode_case(
    context_lens,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_size: int = 128,
    block_size: int = 16,
    q_dtype: torch.dtype = torch.bfloat16,
    kv_dtype: torch.dtype = torch.bfloat16,
    max_qlen: int = 1,
    new_tokens=None,
    scales: str = "per_token",
    strided_q: bool = False,
    extra_blocks: int = 3,
    device="cpu",
    seed: int | None = None,
) -> dict:
    """Keyword arguments of ``paged_attention_common`` for one random problem.

    ``context_lens``: list of ints (0 allowed). ``new_tokens``: per-sequence number
    of new query tokens (defaults to ``max_qlen`` each, capped by the context length
    but at least 1); with ``max_qlen > 1`` a ``qo_indptr`` is built from it.
    ``scales`` ("per_token", "per_tensor" or "both") only matters for 8-bit caches;
    "both" passes per-tensor scales and their per-token expansion, as the ROCm API's
    callers do.
    """
    g = torch.Generator(device=device)
    g.manual_seed(int(torch.randint(0, 2**62, ()).item()) if seed is None else seed)
    num_seqs = len(context_lens)
    blocks_per_seq = [math.ceil(c / block_size) for c in context_lens]
    max_blocks = max([1] + blocks_per_seq)
    num_blocks = sum(blocks_per_seq) + extra_blocks
    # every sequence gets distinct blocks in random order; unused table entries point anywhere valid
    perm = torch.randperm(num_blocks, generator=g, device=device).to(torch.int32)
    table = torch.randint(0, num_blocks, (num_seqs, max_blocks), generator=g, device=device, dtype=torch.int32)
    start = 0
    for s, n in enumerate(blocks_per_seq):
        table[s, :n] = perm[start : start + n]
        start += n

    K = random_cache_values(k_cache_shape(num_blocks, num_kv_heads, head_size, block_size, kv_dtype), kv_dtype, g, device)
    V = random_cache_values(v_cache_shape(num_blocks, num_kv_heads, head_size, block_size, kv_dtype), kv_dtype, g, device)

    if max_qlen > 1:
        if new_tokens is None:
            new_tokens = [max(1, min(max_qlen, c)) for c in context_lens]
        indptr = [0]
        for n in new_tokens:
            indptr.append(indptr[-1] + n)
        qo_indptr = torch.tensor(indptr, dtype=torch.int32, device=device)
    else:
        qo_indptr = None
    num_rows = int(qo_indptr[-1]) if qo_indptr is not None else num_seqs

    q_shape = (num_rows, num_heads, head_size)
    if strided_q:  # Q as the first third of a fused QKV row
        fused = torch.randn(num_rows, 3 * num_heads, head_size, generator=g, device=device).to(q_dtype)
        Q = fused[:, :num_heads]
    else:
        Q = torch.randn(q_shape, generator=g, device=device).to(q_dtype)

    case = dict(
        Q=Q,
        K=K,
        V=V,
        block_tables=table,
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
        block_tables_stride0=table.stride(0),
        scale=1.0 / math.sqrt(head_size),
        max_qlen=max_qlen,
        max_seq_len=max([1] + list(context_lens)),
        qo_indptr=qo_indptr,
    )
    if is_8bit(kv_dtype):
        # stored values span the code range, so scales ~ 1/range keep logits O(1)
        code_range = 127.0 if kv_dtype == torch.int8 else 64.0
        sshape = scale_shape(num_blocks, num_kv_heads, block_size)
        if scales in ("per_tensor", "both"):
            ks = (0.5 + torch.rand(1, generator=g, device=device)) / code_range
            vs = (0.5 + torch.rand(1, generator=g, device=device)) / code_range
            case.update(K_QScale_hip=ks, V_QScale_hip=vs)
            if scales == "both":
                case.update(K_QScale_asm=ks.expand(sshape).contiguous(), V_QScale_asm=vs.expand(sshape).contiguous())
        elif scales == "per_token":
            case.update(
                K_QScale_asm=(0.5 + torch.rand(sshape, generator=g, device=device)) / code_range,
                V_QScale_asm=(0.5 + torch.rand(sshape, generator=g, device=device)) / code_range,
            )
        else:
            raise ValueError(f"scales: expected 'per_token', 'per_tensor' or 'both', got {scales!r}")
    return case


def scale_tokens_along_context(case, factor_of_position, of="K"):
    """Multiplies each sequence's token at position t by factor_of_position(t / len): its logits
    (``of="K"``: through K for 16-bit caches, its per-token scales for 8-bit ones) or its
    values (``of="V"``: through V's per-token scales, 8-bit caches)."""
    table, lens = case["block_tables"].tolist(), case["context_lens"].tolist()
    per_token = f"{of}_QScale_asm" in case
    if of not in ("K", "V") or not (per_token or of == "K"):
        raise ValueError(f"of: expected 'K', or 'V' of a case with per-token scales, got {of!r}")
    shape = case[f"{of}_QScale_asm"].shape if per_token else case["K"].shape
    num_blocks, block_size = shape[0], shape[-1] if per_token else shape[3]
    factor = torch.ones(num_blocks, block_size, dtype=torch.float64)
    for row, n in zip(table, lens):
        for t in range(n):
            factor[row[t // block_size], t % block_size] = factor_of_position(t / n)
    factor = factor.to(case["Q"].device)
    if per_token:
        case[f"{of}_QScale_asm"] = (case[f"{of}_QScale_asm"] * factor[:, None, :]).float()
    else:
        case["K"] = (case["K"].double() * factor[:, None, None, :, None]).to(case["K"].dtype)


def round_half_away_from_zero(q: torch.Tensor) -> torch.Tensor:
    """int8 quantization's rounding of fp32 quotients, computed independently of the package's
    (in float64, where |q| + 0.5 is exact for every fp32 q; in fp32 the sum rounds values just
    below a half up)."""
    return (torch.sign(q) * torch.floor(q.double().abs() + 0.5)).to(q.dtype)
