"""One decode call of the benchmark, converted to what peer kernels take.

Peers (FlashInfer, XQA, ...) read a paged cache in the NHD layout
``[num_blocks, block_size, num_kv_heads, head_size]`` with one dequantization
scale per tensor. :func:`peer_inputs` converts a ``paged_attention_common`` call
(shuffled caches, per-token scales on 8-bit caches) once per case, outside the
timed region:

- K and V are unshuffled into new NHD tensors, same blocks, same block table;
- an 8-bit cache with per-token scales is requantized to one scale per tensor
  (``amax / FP8_MAX`` of the dequantized values), so the peer reads the same
  number of bytes; its values then differ from ours by one fp8 rounding.

A peer is therefore checked against :meth:`PeerInputs.reference`, the package's
reference run on the peer's own values, not against the reference of ours: one fp8
rounding of K moves the exact answer by a few percent, more than a correct
kernel's own error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...layouts import shuffle_from_nhd, unshuffle_to_nhd
from ...reference import reference_paged_attention
from ...testing import FP8_MAX

REQUANTIZE_CHUNK_BLOCKS = 4096
"""Cache blocks dequantized at once (float32) while requantizing: bounds the
temporary memory on multi-GB caches (4096 blocks x 16 tokens x 8 heads x 128 x 4 B = 256 MB)."""


@dataclass(frozen=True)
class PeerInputs:
    """A decode call in the peers' terms: one query row per sequence."""

    q: torch.Tensor  # [num_seqs, num_heads, head_size], contiguous
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_size] (NHD)
    v_cache: torch.Tensor  # same shape and dtype
    k_scale: float  # dequantization scale of the whole K cache (1.0 for 16-bit caches)
    v_scale: float
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq], ours unchanged
    context_lens: torch.Tensor  # int32 [num_seqs]
    max_seq_len: int
    scale: float  # softmax scale
    requantized: bool  # True when per-token scales were folded into one per tensor

    @property
    def num_seqs(self) -> int:
        return self.q.shape[0]

    @property
    def num_heads(self) -> int:
        return self.q.shape[1]

    @property
    def head_size(self) -> int:
        return self.q.shape[2]

    @property
    def block_size(self) -> int:
        return self.k_cache.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.k_cache.shape[2]

    @property
    def kv_dtype(self) -> torch.dtype:
        return self.k_cache.dtype

    def reference(self, seq_indices) -> torch.Tensor:
        """The float32 output rows of the sequences ``seq_indices`` (in that order), by
        :func:`~pa_hybrid.reference.reference_paged_attention` on these inputs: the
        blocks those sequences use, copied back to the shuffled layout, with these
        per-tensor scales. What a correct peer returns for them."""
        device = self.q.device
        seq = torch.tensor(list(seq_indices), dtype=torch.long, device=device)
        lens = self.context_lens[seq]
        pages = (lens.long() + self.block_size - 1) // self.block_size
        columns = torch.arange(max(1, int(pages.max())) if len(seq) else 1, device=device)
        used = columns.unsqueeze(0) < pages.unsqueeze(1)
        blocks = self.block_tables[seq][:, : columns.numel()][used].long()
        table = torch.zeros(used.shape, dtype=torch.int32, device=device)
        table[used] = torch.arange(blocks.numel(), dtype=torch.int32, device=device)
        K, V = shuffle_from_nhd(self.k_cache[blocks], self.v_cache[blocks])
        scales = dict(
            K_QScale_hip=torch.tensor([self.k_scale], device=device),
            V_QScale_hip=torch.tensor([self.v_scale], device=device),
        )
        return reference_paged_attention(
            Q=self.q[seq], K=K, V=V, block_tables=table, context_lens=lens, scale=self.scale, **scales
        )


def requantize_per_tensor(cache: torch.Tensor, token_scales: torch.Tensor) -> float:
    """Requantize an fp8 NHD ``cache`` whose token ``(block, slot, head)`` dequantizes
    with ``token_scales[block, head, slot]`` to one scale for the whole tensor, in
    place; returns that scale. Works through :data:`REQUANTIZE_CHUNK_BLOCKS` blocks
    at a time; reads the maximum back to the host once."""
    if cache.dtype != torch.float8_e4m3fn:
        raise TypeError(f"cache: expected torch.float8_e4m3fn (NHD), got {cache.dtype}")
    num_blocks, block_size, num_kv_heads, _ = cache.shape
    if tuple(token_scales.shape) != (num_blocks, num_kv_heads, block_size):
        raise ValueError(
            f"token_scales: expected shape {(num_blocks, num_kv_heads, block_size)} for a cache of shape "
            f"{tuple(cache.shape)}, got {tuple(token_scales.shape)}"
        )
    per_slot = token_scales.permute(0, 2, 1).float()  # [block, slot, head], as the NHD cache is indexed
    chunks = [slice(b, b + REQUANTIZE_CHUNK_BLOCKS) for b in range(0, num_blocks, REQUANTIZE_CHUNK_BLOCKS)]
    amax = torch.zeros((), dtype=torch.float32, device=cache.device)
    for c in chunks:
        amax = torch.maximum(amax, (cache[c].float().abs().amax(-1) * per_slot[c].abs()).amax())
    scale = float(amax.clamp_min(1e-30)) / FP8_MAX
    for c in chunks:
        rescaled = cache[c].float() * (per_slot[c] / scale).unsqueeze(-1)
        cache[c] = rescaled.clamp_(-FP8_MAX, FP8_MAX).to(cache.dtype)
    return scale


def peer_inputs(case: dict) -> PeerInputs:
    """:class:`PeerInputs` of one ``paged_attention_common(**case)`` decode call.

    Raises ValueError for calls peers do not take here: more than one query row per
    sequence (``qo_indptr``), or an 8-bit cache other than fp8 e4m3 (no peer of the
    benchmark reads int8)."""
    if case.get("qo_indptr") is not None:
        raise ValueError("peer inputs: only decode calls (one query row per sequence, no qo_indptr)")
    K, V = case["K"], case["V"]
    if K.element_size() == 1 and K.dtype != torch.float8_e4m3fn:
        raise ValueError(f"peer inputs: 8-bit caches must be torch.float8_e4m3fn, got {K.dtype}")
    k_cache, v_cache = unshuffle_to_nhd(K, V)
    k_scale = v_scale = 1.0
    requantized = False
    if K.element_size() == 1:
        if case.get("K_QScale_asm") is not None:
            k_scale = requantize_per_tensor(k_cache, case["K_QScale_asm"])
            v_scale = requantize_per_tensor(v_cache, case["V_QScale_asm"])
            requantized = True
        else:
            k_scale, v_scale = float(case["K_QScale_hip"]), float(case["V_QScale_hip"])
    return PeerInputs(
        q=case["Q"].contiguous(),
        k_cache=k_cache,
        v_cache=v_cache,
        k_scale=k_scale,
        v_scale=v_scale,
        block_tables=case["block_tables"],
        context_lens=case["context_lens"],
        max_seq_len=int(case["max_seq_len"]),
        scale=float(case["scale"]),
        requantized=requantized,
    )
