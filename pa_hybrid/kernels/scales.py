"""Expand a per-tensor scale into the per-token scale layout."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FILL_BLOCK = 1024


@triton.jit
def _fill_scale_kernel(out_ptr, scale_ptr, numel, BLOCK: tl.constexpr):
    """``out[i] = scale[0]`` for ``i < numel`` (``out`` contiguous fp32).

    The scale is read on the device, so expanding never synchronizes with the host.
    """
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    value = tl.load(scale_ptr).to(tl.float32)
    tl.store(out_ptr + offsets, tl.full([BLOCK], 0.0, tl.float32) + value, mask=offsets < numel)


def launch_fill_scale(out: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Fill the contiguous fp32 ``out`` with ``scale[0]`` (unchecked; see ``quant.py``)."""
    numel = out.numel()
    if numel:
        _fill_scale_kernel[(triton.cdiv(numel, FILL_BLOCK),)](out, scale, numel, BLOCK=FILL_BLOCK, num_warps=4)
    return out
