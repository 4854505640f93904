"""Copy a paged KV cache from one layout into another (bit-exact).

Every layout is addressed per (block, kv head) tile as
``ptr + block * stride_block + head * stride_head + tile_offset(token, dim)``
where ``tile_offset`` depends on the layout id:

* ``STRIDED``: ``token * stride_token + dim * stride_dim``. Covers NHD
  ``[blocks, block_size, kv_heads, head_size]`` and vLLM's V
  ``[blocks, kv_heads, head_size, block_size]`` (and any view of them).
* ``SHUFFLED_K``: ``[head_size // x, block_size, x]`` contiguous (``k_tile_offset``).
* ``SHUFFLED_V``: ``[block_size // x, head_size, x]`` contiguous (``v_tile_offset``).

The launcher reinterprets the cache as same-size integers, so the copy moves bits
and is exact for every dtype (fp8 flavours included).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import k_tile_offset, v_tile_offset

STRIDED, SHUFFLED_K, SHUFFLED_V = 0, 1, 2
"""Layout ids (the ``*_LAYOUT`` constexprs of the kernel)."""

_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32}


@triton.jit
def _tile_offset(
    token,  # [BLOCK_SIZE_PAD, 1]
    dim,  # [1, HEAD_SIZE_PAD]
    stride_token,
    stride_dim,
    LAYOUT: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    X: tl.constexpr,
):
    """Element offset of (token, dim) inside one (block, kv head) tile of ``LAYOUT``."""
    if LAYOUT == 0:  # STRIDED
        offset = token.to(tl.int64) * stride_token + dim.to(tl.int64) * stride_dim
    elif LAYOUT == 1:  # SHUFFLED_K
        offset = k_tile_offset(token, dim, BLOCK_SIZE, X)
    else:  # SHUFFLED_V
        offset = v_tile_offset(token, dim, HEAD_SIZE, BLOCK_SIZE, X)
    return offset


@triton.jit
def _convert_layout_kernel(
    src_ptr,
    dst_ptr,
    src_stride_block,
    src_stride_head,
    src_stride_token,  # read only when SRC_LAYOUT is STRIDED
    src_stride_dim,
    dst_stride_block,
    dst_stride_head,
    dst_stride_token,
    dst_stride_dim,
    BLOCK_SIZE: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    BLOCK_SIZE_PAD: tl.constexpr,  # next powers of two (tl.arange needs them)
    HEAD_SIZE_PAD: tl.constexpr,
    X: tl.constexpr,
    SRC_LAYOUT: tl.constexpr,
    DST_LAYOUT: tl.constexpr,
):
    """dst[block, head, token, dim] = src[block, head, token, dim] for one (block, head) tile.

    One program per (block, kv head): grid ``(num_blocks, num_kv_heads)``. The block
    term is int64 because whole caches pass 2^31 elements.
    """
    block = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    token = tl.arange(0, BLOCK_SIZE_PAD)[:, None]
    dim = tl.arange(0, HEAD_SIZE_PAD)[None, :]
    mask = (token < BLOCK_SIZE) & (dim < HEAD_SIZE)
    src = src_ptr + block * src_stride_block + head * src_stride_head
    dst = dst_ptr + block * dst_stride_block + head * dst_stride_head
    src_offset = _tile_offset(token, dim, src_stride_token, src_stride_dim, SRC_LAYOUT, BLOCK_SIZE, HEAD_SIZE, X)
    dst_offset = _tile_offset(token, dim, dst_stride_token, dst_stride_dim, DST_LAYOUT, BLOCK_SIZE, HEAD_SIZE, X)
    tile = tl.load(src + src_offset, mask=mask)
    tl.store(dst + dst_offset, tile, mask=mask)


class TileLayout:
    """How one cache tensor is addressed: a layout id and the four strides
    ``(block, head, token, dim)`` in elements (token/dim only matter for STRIDED)."""

    __slots__ = ("layout", "strides")

    def __init__(self, layout: int, strides: tuple):
        self.layout = layout
        self.strides = tuple(int(s) for s in strides)

    @classmethod
    def nhd(cls, t: torch.Tensor) -> "TileLayout":
        """``[blocks, block_size, kv_heads, head_size]``."""
        sb, st, sh, sd = t.stride()
        return cls(STRIDED, (sb, sh, st, sd))

    @classmethod
    def vllm_v(cls, t: torch.Tensor) -> "TileLayout":
        """``[blocks, kv_heads, head_size, block_size]``."""
        sb, sh, sd, st = t.stride()
        return cls(STRIDED, (sb, sh, st, sd))

    @classmethod
    def shuffled_k(cls, t: torch.Tensor) -> "TileLayout":
        """``[blocks, kv_heads, head_size // x, block_size, x]``, last three dims contiguous."""
        return cls(SHUFFLED_K, (t.stride(0), t.stride(1), 0, 0))

    @classmethod
    def shuffled_v(cls, t: torch.Tensor) -> "TileLayout":
        """``[blocks, kv_heads, block_size // x, head_size, x]``, last three dims contiguous."""
        return cls(SHUFFLED_V, (t.stride(0), t.stride(1), 0, 0))


def convert_layout(
    src: torch.Tensor,
    src_layout: TileLayout,
    dst: torch.Tensor,
    dst_layout: TileLayout,
    num_blocks: int,
    num_kv_heads: int,
    block_size: int,
    head_size: int,
    x: int,
) -> torch.Tensor:
    """Copy every (block, head) tile of ``src`` into ``dst`` (unchecked; callers in
    ``layouts.py`` validate). ``src`` and ``dst`` have the same element size."""
    if num_blocks == 0 or num_kv_heads == 0:
        return dst
    as_int = _INT_OF_SIZE[src.element_size()]
    _convert_layout_kernel[(num_blocks, num_kv_heads)](
        src.view(as_int),
        dst.view(as_int),
        *src_layout.strides,
        *dst_layout.strides,
        BLOCK_SIZE=block_size,
        HEAD_SIZE=head_size,
        BLOCK_SIZE_PAD=triton.next_power_of_2(block_size),
        HEAD_SIZE_PAD=triton.next_power_of_2(head_size),
        X=x,
        SRC_LAYOUT=src_layout.layout,
        DST_LAYOUT=dst_layout.layout,
        num_warps=4,
    )
    return dst
