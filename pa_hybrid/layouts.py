"""Shapes, dtypes and layout conversions of the shuffled ("asm") KV cache.

``x = 16 // element_size(kv dtype)`` elements make one 16-byte vector:

===================  ==============================================================
K (shuffled)         ``[num_blocks, num_kv_heads, head_size // x, block_size, x]``
V (shuffled)         ``[num_blocks, num_kv_heads, block_size // x, head_size, x]``
V (vLLM)             ``[num_blocks, num_kv_heads, head_size, block_size]``
K/V (NHD, "flash")   ``[num_blocks, block_size, num_kv_heads, head_size]``
per-token scales     ``[num_blocks, num_kv_heads, block_size]`` fp32
===================  ==============================================================

vLLM's K cache already is the shuffled K layout; only V differs. Within one
(block, kv head) tile the last three dims of K and V must be contiguous; the
block and head strides are free (so ``kv[0]``/``kv[1]`` views of one allocation
work).

The conversions below run one Triton kernel each (``kernels/layout_convert.py``)
and are exact: no arithmetic touches the values.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_device_match, check_dtype, check_positive_int, check_rank, check_shape, check_tensor
from .kernels.common import interpreting
from .kernels.layout_convert import TileLayout, convert_layout

PARTITION_SIZE = 256
"""Tokens per split-KV partition; callers size scratch with ``ceil(max_seq_len / 256)``."""

KV_DTYPES = (torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.int8)
"""Logical KV-cache dtypes. e4m3fnuz (the ROCm flavour) is accepted by the reference only."""

QUERY_DTYPES = (torch.bfloat16, torch.float16)
TMP_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_FP8_NAMES = ("fp8", "fp8_e4m3")
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
_NAMED_KV_DTYPES = {
    "bf16": (torch.bfloat16,),
    "bfloat16": (torch.bfloat16,),
    "fp16": (torch.float16,),
    "float16": (torch.float16,),
    "int8": (torch.int8,),
    "fp8": _FP8_DTYPES,
    "fp8_e4m3": _FP8_DTYPES,
}
_KV_CACHE_DTYPE_NAMES = ("auto",) + tuple(_NAMED_KV_DTYPES)


def x_for(dtype: torch.dtype) -> int:
    """Elements per 16-byte vector of the shuffled layout: 8 for 16-bit, 16 for 8-bit."""
    size = dtype.itemsize
    if 16 % size:
        raise ValueError(f"dtype {dtype} has element size {size}, which does not divide 16 bytes")
    return 16 // size


def is_8bit(dtype: torch.dtype) -> bool:
    return dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.int8)


def resolve_kv_dtype(
    cache_tensor_dtype: torch.dtype,
    kv_cache_dtype: str = "auto",
    kv_cache_tensor_dtype: torch.dtype | None = None,
) -> torch.dtype:
    """The logical dtype of a KV cache tensor.

    ``kv_cache_tensor_dtype`` wins when given (engines that store fp8 as uint8 say
    so there); otherwise ``kv_cache_dtype`` "fp8"/"fp8_e4m3" turns a uint8 tensor
    into e4m3fn, and "auto" means the tensor's own dtype.
    """
    if not isinstance(kv_cache_dtype, str) or kv_cache_dtype not in _KV_CACHE_DTYPE_NAMES:
        raise ValueError(
            f"kv_cache_dtype: expected one of {_KV_CACHE_DTYPE_NAMES}, got {kv_cache_dtype!r}"
        )
    if kv_cache_tensor_dtype is not None:
        if not isinstance(kv_cache_tensor_dtype, torch.dtype):
            raise TypeError(
                f"kv_cache_tensor_dtype: expected a torch.dtype, got {type(kv_cache_tensor_dtype).__name__}"
            )
        logical = kv_cache_tensor_dtype
    elif kv_cache_dtype in _FP8_NAMES and cache_tensor_dtype in (torch.uint8, torch.int8):
        logical = torch.float8_e4m3fn
    else:
        logical = cache_tensor_dtype
    if logical not in KV_DTYPES + (torch.float8_e4m3fnuz,):
        raise TypeError(
            f"K/V: expected a cache of dtype bfloat16, float16, float8_e4m3fn or int8 "
            f"(or uint8 with kv_cache_dtype='fp8'), got {cache_tensor_dtype}"
            + (f" declared as {kv_cache_tensor_dtype}" if kv_cache_tensor_dtype is not None else "")
        )
    expected = _NAMED_KV_DTYPES.get(kv_cache_dtype)
    if expected is not None and logical not in expected:
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} but the cache holds {logical}")
    if logical.itemsize != cache_tensor_dtype.itemsize:
        raise TypeError(
            f"kv_cache_tensor_dtype: {logical} has a different element size than the cache tensor's {cache_tensor_dtype}"
        )
    return logical


def k_cache_shape(num_blocks: int, num_kv_heads: int, head_size: int, block_size: int, dtype: torch.dtype):
    x = _checked_geometry(num_blocks, num_kv_heads, head_size, block_size, dtype)
    return (num_blocks, num_kv_heads, head_size // x, block_size, x)


def v_cache_shape(num_blocks: int, num_kv_heads: int, head_size: int, block_size: int, dtype: torch.dtype):
    x = _checked_geometry(num_blocks, num_kv_heads, head_size, block_size, dtype)
    return (num_blocks, num_kv_heads, block_size // x, head_size, x)


def scale_shape(num_blocks: int, num_kv_heads: int, block_size: int):
    check_positive_int(num_blocks, "num_blocks", allow_zero=True)
    check_positive_int(num_kv_heads, "num_kv_heads")
    check_positive_int(block_size, "block_size")
    return (num_blocks, num_kv_heads, block_size)


def _checked_geometry(num_blocks, num_kv_heads, head_size, block_size, dtype) -> int:
    """x of ``dtype``, once the sizes are ints that make a cache of it (0 blocks allowed)."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype: expected a torch.dtype (e.g. torch.bfloat16, torch.float8_e4m3fn), got {dtype!r}")
    check_positive_int(num_blocks, "num_blocks", allow_zero=True)
    for name, n in (("num_kv_heads", num_kv_heads), ("head_size", head_size), ("block_size", block_size)):
        check_positive_int(n, name)
    x = x_for(dtype)
    _check_divisible(head_size, x, "head_size", dtype)
    _check_divisible(block_size, x, "block_size", dtype)
    return x


def max_num_partitions(max_seq_len: int) -> int:
    """Split-KV partitions needed for the longest context (at least one)."""
    return max(1, math.ceil(max_seq_len / PARTITION_SIZE))


def scratch_shapes(num_q_rows: int, num_heads: int, head_size: int, max_seq_len: int) -> dict:
    """Shapes of the split-KV scratch for ``paged_attention_common``.

    ``num_q_rows`` is ``Q.shape[0]``: the number of sequences in decode, the total
    number of new query tokens with ``max_qlen > 1``.
    """
    check_positive_int(num_q_rows, "num_q_rows", allow_zero=True)
    check_positive_int(num_heads, "num_heads")
    check_positive_int(head_size, "head_size")
    check_positive_int(max_seq_len, "max_seq_len", allow_zero=True)
    p = max_num_partitions(max_seq_len)
    return {
        "exp_sums": (num_q_rows, num_heads, p),
        "max_logits": (num_q_rows, num_heads, p),
        "tmp_out": (num_q_rows, num_heads, p, head_size),
    }


def allocate_scratch(
    num_q_rows: int,
    num_heads: int,
    head_size: int,
    max_seq_len: int,
    device,
    tmp_out_dtype: torch.dtype = torch.float32,
):
    """Allocate ``(exp_sums, max_logits, tmp_out)`` sized by :func:`scratch_shapes`
    (``tmp_out_dtype``: float32, or bfloat16/float16 to halve its bytes)."""
    if tmp_out_dtype not in TMP_OUT_DTYPES:
        raise TypeError(f"tmp_out_dtype: expected one of {TMP_OUT_DTYPES}, got {tmp_out_dtype!r}")
    shapes = scratch_shapes(num_q_rows, num_heads, head_size, max_seq_len)
    return (
        torch.empty(shapes["exp_sums"], dtype=torch.float32, device=device),
        torch.empty(shapes["max_logits"], dtype=torch.float32, device=device),
        torch.empty(shapes["tmp_out"], dtype=tmp_out_dtype, device=device),
    )


def _check_divisible(n: int, x: int, name: str, dtype: torch.dtype):
    if n % x:
        raise ValueError(f"{name}: must be divisible by x={x} for a {dtype} cache, got {n}")


# --------------------------------------------------------------------------- #
# Geometry of caches given by the caller
# --------------------------------------------------------------------------- #


def shuffled_geometry(K: torch.Tensor, V: torch.Tensor, dtype: torch.dtype | None = None):
    """``(num_blocks, num_kv_heads, head_size, block_size, x)`` of a shuffled K/V pair.

    Raises ``ValueError`` naming the tensor when the two disagree or a dim is off.
    """
    check_rank(K, 5, "K", "[num_blocks, num_kv_heads, head_size // x, block_size, x]")
    check_rank(V, 5, "V", "[num_blocks, num_kv_heads, block_size // x, head_size, x]")
    check_device_match(V, K, "V", "K")
    dtype = dtype or K.dtype
    x = x_for(dtype)
    num_blocks, num_kv_heads, d_over_x, block_size, kx = K.shape
    if kx != x:
        raise ValueError(f"K: last dim must be x={x} for a {dtype} cache, got shape {tuple(K.shape)}")
    if 0 in (num_kv_heads, d_over_x, block_size):
        raise ValueError(f"K: expected at least one kv head, head dim chunk and token per block, got shape {tuple(K.shape)}")
    head_size = d_over_x * x
    expected_v = (num_blocks, num_kv_heads, block_size // x, head_size, x)
    if block_size % x or tuple(V.shape) != expected_v:
        raise ValueError(
            f"V: expected shape {expected_v} to match K of shape {tuple(K.shape)} "
            f"(block_size={block_size} must be divisible by x={x}), got {tuple(V.shape)}"
        )
    if V.dtype != K.dtype:
        raise TypeError(f"V: expected the dtype of K ({K.dtype}), got {V.dtype}")
    for name, t in (("K", K), ("V", V)):
        if not _inner_contiguous(t, 3):
            raise ValueError(
                f"{name}: the last three dims must be contiguous (block and head strides may be anything), "
                f"got strides {t.stride()} for shape {tuple(t.shape)}"
            )
    return num_blocks, num_kv_heads, head_size, block_size, x


def _inner_contiguous(t: torch.Tensor, ndims: int) -> bool:
    if t.numel() == 0:  # nothing to address (torch keeps permuted strides on empty tensors)
        return True
    expected = 1
    for size, stride in zip(reversed(t.shape[-ndims:]), reversed(t.stride()[-ndims:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


# --------------------------------------------------------------------------- #
# Conversions (Triton kernels in kernels/layout_convert.py)
# --------------------------------------------------------------------------- #

_CONVERTIBLE_DTYPES = KV_DTYPES + (torch.float8_e4m3fnuz, torch.uint8)
_NHD = "[num_blocks, block_size, num_kv_heads, head_size]"
_VLLM_K = "[num_blocks, num_kv_heads, head_size // x, block_size, x]"
_VLLM_V = "[num_blocks, num_kv_heads, head_size, block_size]"


def shuffle_from_nhd(key_cache: torch.Tensor, value_cache: torch.Tensor):
    """NHD ("flash") caches ``[num_blocks, block_size, num_kv_heads, head_size]`` ->
    new shuffled ``(K, V)`` of the same dtype. Inputs may be any strided views."""
    _check_pair(key_cache, value_cache, 4, _NHD)
    check_shape(value_cache, key_cache.shape, "value_cache", f"{_NHD} (the shape of key_cache)")
    num_blocks, block_size, num_kv_heads, head_size = key_cache.shape
    x = _check_tile_dims(key_cache, "key_cache", head_size, block_size)
    check_kernel_device(key_cache, "key_cache")
    K, V = _empty_shuffled(key_cache, num_blocks, num_kv_heads, head_size, block_size)
    geometry = (num_blocks, num_kv_heads, block_size, head_size, x)
    convert_layout(key_cache, TileLayout.nhd(key_cache), K, TileLayout.shuffled_k(K), *geometry)
    convert_layout(value_cache, TileLayout.nhd(value_cache), V, TileLayout.shuffled_v(V), *geometry)
    return K, V


def shuffle_from_vllm(key_cache: torch.Tensor, value_cache: torch.Tensor):
    """vLLM caches -> new shuffled ``(K, V)`` of the same dtype.

    ``key_cache`` ``[num_blocks, num_kv_heads, head_size // x, block_size, x]`` already is
    the shuffled K layout (returned as a contiguous copy); ``value_cache``
    ``[num_blocks, num_kv_heads, head_size, block_size]`` is reordered.
    """
    check_rank(key_cache, 5, "key_cache", _VLLM_K)
    _check_pair(key_cache, value_cache, None, None)
    check_rank(value_cache, 4, "value_cache", _VLLM_V)
    num_blocks, num_kv_heads, d_over_x, block_size, kx = key_cache.shape
    x = x_for(key_cache.dtype)
    if kx != x:
        raise ValueError(
            f"key_cache: last dim must be x={x} for a {key_cache.dtype} cache {_VLLM_K}, got shape {tuple(key_cache.shape)}"
        )
    head_size = d_over_x * x
    check_shape(value_cache, (num_blocks, num_kv_heads, head_size, block_size), "value_cache", _VLLM_V)
    _check_tile_dims(key_cache, "key_cache", head_size, block_size)
    check_kernel_device(key_cache, "key_cache")
    V = torch.empty(v_cache_shape(num_blocks, num_kv_heads, head_size, block_size, key_cache.dtype),
                    dtype=key_cache.dtype, device=key_cache.device)  # fmt: skip
    geometry = (num_blocks, num_kv_heads, block_size, head_size, x)
    convert_layout(value_cache, TileLayout.vllm_v(value_cache), V, TileLayout.shuffled_v(V), *geometry)
    return key_cache.clone(memory_format=torch.contiguous_format), V


def unshuffle_to_nhd(K: torch.Tensor, V: torch.Tensor):
    """Shuffled ``(K, V)`` -> new NHD caches ``[num_blocks, block_size, num_kv_heads, head_size]``
    (the inverse of :func:`shuffle_from_nhd`, for debugging)."""
    num_blocks, num_kv_heads, head_size, block_size, x = _shuffled_input(K, V)
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    key_cache = torch.empty(shape, dtype=K.dtype, device=K.device)
    value_cache = torch.empty(shape, dtype=K.dtype, device=K.device)
    geometry = (num_blocks, num_kv_heads, block_size, head_size, x)
    convert_layout(K, TileLayout.shuffled_k(K), key_cache, TileLayout.nhd(key_cache), *geometry)
    convert_layout(V, TileLayout.shuffled_v(V), value_cache, TileLayout.nhd(value_cache), *geometry)
    return key_cache, value_cache


def unshuffle_to_vllm(K: torch.Tensor, V: torch.Tensor):
    """Shuffled ``(K, V)`` -> new vLLM caches (K unchanged, V
    ``[num_blocks, num_kv_heads, head_size, block_size]``); the inverse of
    :func:`shuffle_from_vllm`, for debugging."""
    num_blocks, num_kv_heads, head_size, block_size, x = _shuffled_input(K, V)
    value_cache = torch.empty((num_blocks, num_kv_heads, head_size, block_size), dtype=V.dtype, device=V.device)
    geometry = (num_blocks, num_kv_heads, block_size, head_size, x)
    convert_layout(V, TileLayout.shuffled_v(V), value_cache, TileLayout.vllm_v(value_cache), *geometry)
    return K.clone(memory_format=torch.contiguous_format), value_cache


def check_kernel_device(t: torch.Tensor, name: str) -> None:
    """Triton kernels need GPU tensors, except under the CPU interpreter (TRITON_INTERPRET=1)."""
    if t.device.type == "cpu" and not interpreting():
        raise ValueError(
            f"{name}: Triton kernels need tensors on a GPU, got a tensor on cpu "
            "(set TRITON_INTERPRET=1 to run them on the CPU with Triton's interpreter)"
        )


def _check_pair(key, value, rank, layout):
    """Both tensors, same dtype (one the conversions can copy) and device; rank when given."""
    for name, t in (("key_cache", key), ("value_cache", value)):
        if rank is not None:
            check_rank(t, rank, name, layout)
        else:
            check_tensor(t, name)
    check_dtype(key, _CONVERTIBLE_DTYPES, "key_cache")
    if value.dtype != key.dtype:
        raise TypeError(f"value_cache: expected the dtype of key_cache ({key.dtype}), got {value.dtype}")
    check_device_match(value, key, "value_cache", "key_cache")


def _check_tile_dims(t: torch.Tensor, name: str, head_size: int, block_size: int) -> int:
    x = x_for(t.dtype)
    for what, n in (("head_size", head_size), ("block_size", block_size)):
        if n == 0:
            raise ValueError(f"{name}: {what} must be positive, got 0 (shape {tuple(t.shape)})")
        if n % x:
            raise ValueError(
                f"{name}: {what} must be divisible by x={x} for a {t.dtype} cache, got {n} (shape {tuple(t.shape)})"
            )
    return x


def _shuffled_input(K: torch.Tensor, V: torch.Tensor):
    check_tensor(K, "K")
    check_tensor(V, "V")
    check_dtype(K, _CONVERTIBLE_DTYPES, "K")
    geometry = shuffled_geometry(K, V)
    check_kernel_device(K, "K")  # last: every other mistake is reported first
    return geometry


def _empty_shuffled(like: torch.Tensor, num_blocks, num_kv_heads, head_size, block_size):
    dtype, device = like.dtype, like.device
    K = torch.empty(k_cache_shape(num_blocks, num_kv_heads, head_size, block_size, dtype), dtype=dtype, device=device)
    V = torch.empty(v_cache_shape(num_blocks, num_kv_heads, head_size, block_size, dtype), dtype=dtype, device=device)
    return K, V
