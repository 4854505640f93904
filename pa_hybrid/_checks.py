"""Argument checks shared by every public function.

Each raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape,
device or value) whose message names the argument, what was expected and what
was given. None of them reads device memory.
"""

from __future__ import annotations

import torch


def check_tensor(t, name: str, *, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")


def check_rank(t: torch.Tensor, rank: int, name: str, layout: str = "") -> None:
    check_tensor(t, name)
    if t.dim() != rank:
        shape = f" {layout}" if layout else ""
        raise ValueError(f"{name}: expected a {rank}-D tensor{shape}, got shape {tuple(t.shape)}")


def check_shape(t: torch.Tensor, shape: tuple, name: str, layout: str = "") -> None:
    check_tensor(t, name)
    if tuple(t.shape) != tuple(shape):
        hint = f" {layout}" if layout else ""
        raise ValueError(f"{name}: expected shape {tuple(shape)}{hint}, got {tuple(t.shape)}")


def check_dtype(t: torch.Tensor, dtypes, name: str) -> None:
    check_tensor(t, name)
    if isinstance(dtypes, torch.dtype):
        dtypes = (dtypes,)
    if t.dtype not in dtypes:
        names = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype {names}, got {str(t.dtype).replace('torch.', '')}")


def check_device_match(t: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name}: expected a tensor on {ref.device} (the device of {ref_name}), got {t.device}")


def check_last_dim_contiguous(t: torch.Tensor, name: str) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: the last dim must be contiguous (stride 1), got strides {t.stride()}")


def check_positive_int(v, name: str, *, allow_zero: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name}: expected a {'non-negative' if allow_zero else 'positive'} int, got {v}")


def check_validate(validate) -> None:
    """``validate``: "shapes" (metadata only, no host sync) or "full" (device data too)."""
    if validate not in ("shapes", "full"):
        raise ValueError(f"validate: expected 'shapes' or 'full', got {validate!r}")


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last) bytes a tensor's elements may touch (its strides' reach, gaps included)."""
    begin, numel = t.data_ptr(), t.numel()
    if numel == 0 or t.is_contiguous():
        return begin, begin + numel * t.element_size()
    reach = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return begin, begin + (reach + 1) * t.element_size()


def _overlaps_itself(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may share memory. torch answers 1 (yes: a zero stride) or
    0 (no: contiguous) cheaply and 2 when it cannot tell; then the dims, by stride, must nest:
    each stride at least the extent of the smaller-strided dims (views of interleaved buffers
    pass; a layout that interleaves its own dims otherwise is refused as a possible overlap)."""
    verdict = torch._debug_has_internal_overlap(t)
    if verdict != 2:
        return verdict == 1
    extent = 1  # elements spanned by the dims taken so far
    for stride, size in sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size > 1):
        if stride < extent:
            return True
        extent += stride * (size - 1)
    return False


def check_not_expanded(t: torch.Tensor, name: str) -> None:
    """A tensor a kernel writes must not have elements that share memory (an expanded view, or
    strides that make rows overlap)."""
    if not t.is_contiguous() and _overlaps_itself(t):
        raise ValueError(
            f"{name}: its elements must not share memory (an expanded or overlapping view?), "
            f"got shape {tuple(t.shape)} and strides {t.stride()}"
        )


def check_distinct_outputs(named: dict) -> None:
    """Outputs that may interleave in one buffer (K and V caches of one [num_blocks, 2, ...]
    allocation): none expanded, and no two the same view (the same start address: one tensor
    passed twice). Metadata only."""
    starts = {}
    for name, t in named.items():
        check_not_expanded(t, name)
        if t.device.type == "meta" or not t.numel():  # no memory to share
            continue
        key = (t.device, t.data_ptr())
        if key in starts:
            raise ValueError(f"{name}: must not be the same memory as {starts[key]} (each is written by the kernels)")
        starts[key] = name


def check_no_overlap(named: dict) -> None:
    """Outputs a kernel writes must not share memory: neither one tensor with itself (an
    expanded view) nor two with each other (their strides' reach, so interleaved views of one
    buffer count as overlapping too). Metadata only."""
    spans = []
    for name, t in named.items():
        check_not_expanded(t, name)
        spans.append((name, t.device, *_byte_span(t)))
    for i, (name, device, begin, end) in enumerate(spans):
        for other, other_device, other_begin, other_end in spans[:i]:
            if device == other_device and begin < other_end and other_begin < end:
                raise ValueError(f"{name}: must not share memory with {other} (each is written by the kernels)")
