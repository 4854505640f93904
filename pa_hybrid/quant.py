"""fp8/int8 quantization of KV caches and scale expansion.

Symmetric quantization with ``qmax`` = 448 (float8_e4m3fn) or 127 (int8):
``stored = round(clamp(real / s, -qmax, qmax))``, ``real ~= stored * s``, where
``round`` is round-to-nearest-even for fp8 (the dtype conversion) and half away from
zero for int8 (``sign(v) * (floor(|v|) + (|v| - floor(|v|) >= 0.5))``: exact, where
``floor(|v| + 0.5)`` rounds values just below a half up). Per token: ``s = max_d |real| / qmax``
over the head dim of one (token, kv head) vector (1.0 for an all-zero vector);
per tensor: the same over the whole K (or V) cache. This is the rule of
``cache.reshape_and_cache_with_pertoken_quant``, so quantizing a whole cache gives
the bits that writing its tokens gives. Divisions divide by tensors (not Python
numbers, which torch turns into a multiplication by the reciprocal on CUDA), so
they are IEEE divisions like the kernel's.

``quantize_kv_cache``/``dequantize_kv_cache`` are plain torch, for tests, benchmarks
and debugging; ``expand_per_tensor_scale`` is a Triton fill (no host sync).
"""

from __future__ import annotations

import torch

from ._checks import check_device_match, check_dtype, check_shape, check_tensor
from .kernels.scales import launch_fill_scale
from .layouts import check_kernel_device, scale_shape, shuffled_geometry, x_for

FP8_E4M3_MAX = 448.0
INT8_MAX = 127.0
QUANT_DTYPES = (torch.float8_e4m3fn, torch.int8)


def qmax_for(dtype: torch.dtype) -> float:
    """The largest stored magnitude: 448 for float8_e4m3fn, 127 for int8."""
    if dtype == torch.float8_e4m3fn:
        return FP8_E4M3_MAX
    if dtype == torch.int8:
        return INT8_MAX
    raise TypeError(f"dtype: expected float8_e4m3fn or int8, got {dtype}")


def expand_per_tensor_scale(
    scale: torch.Tensor, num_blocks: int, num_kv_heads: int, block_size: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """A per-tensor scale (1-element fp32 tensor) as per-token scales
    ``[num_blocks, num_kv_heads, block_size]`` fp32 (written into ``out`` when given)."""
    check_tensor(scale, "scale")
    if scale.numel() != 1:
        raise ValueError(f"scale: expected a 1-element tensor, got shape {tuple(scale.shape)}")
    check_dtype(scale, torch.float32, "scale")
    for name, n in (("num_blocks", num_blocks), ("num_kv_heads", num_kv_heads), ("block_size", block_size)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{name}: expected a non-negative int, got {n!r}")
    shape = scale_shape(num_blocks, num_kv_heads, block_size)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=scale.device)
    else:
        check_shape(out, shape, "out", "[num_blocks, num_kv_heads, block_size]")
        check_dtype(out, torch.float32, "out")
        check_device_match(out, scale, "out", "scale")
        if not out.is_contiguous():
            raise ValueError(f"out: must be contiguous, got strides {out.stride()}")
    check_kernel_device(scale, "scale")
    return launch_fill_scale(out, scale)


def quantize_kv_cache(K: torch.Tensor, V: torch.Tensor, dtype: torch.dtype, per_token: bool = True):
    """Quantize a shuffled 16-bit cache (x=8) into a new shuffled 8-bit cache (x=16).

    Returns ``(K8, V8, k_scale, v_scale)``: the caches in ``dtype`` (float8_e4m3fn or
    int8) and their dequantization scales, ``[num_blocks, num_kv_heads, block_size]``
    fp32 when ``per_token`` else 1-element fp32 tensors. ``block_size`` and
    ``head_size`` must be multiples of 16 (the 8-bit x).
    """
    check_tensor(K, "K")
    check_tensor(V, "V")
    check_dtype(K, (torch.bfloat16, torch.float16), "K")
    num_blocks, num_kv_heads, head_size, block_size, _ = shuffled_geometry(K, V)
    if not isinstance(dtype, torch.dtype) or dtype not in QUANT_DTYPES:
        raise TypeError(f"dtype: expected torch.float8_e4m3fn or torch.int8, got {dtype!r}")
    x8 = x_for(dtype)
    for what, n in (("head_size", head_size), ("block_size", block_size)):
        if n % x8:
            raise ValueError(f"K: {what} must be divisible by x={x8} of a {dtype} cache, got {n}")
    qmax = qmax_for(dtype)
    k, v = _token_major(K, V)  # [num_blocks, block_size, num_kv_heads, head_size] fp32
    out = []
    for t in (k, v):
        if per_token:
            scale = _scale_from_amax(t.abs().amax(dim=-1), qmax)  # [num_blocks, block_size, num_kv_heads]
            stored = quantize_values(t, scale[..., None], dtype)
            scale = scale.permute(0, 2, 1).contiguous()
        else:
            amax = t.abs().amax().reshape(1) if t.numel() else t.new_zeros(1)  # no blocks yet: scale 1
            scale = _scale_from_amax(amax, qmax)
            stored = quantize_values(t, scale, dtype)
        out.append((stored, scale))
    (k8, k_scale), (v8, v_scale) = out
    K8, V8 = _shuffled_from_token_major(k8, v8, x8)
    return K8, V8, k_scale, v_scale


def dequantize_kv_cache(K: torch.Tensor, V: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor,
                        dtype: torch.dtype = torch.bfloat16):  # fmt: skip
    """``real = stored * scale``: a shuffled 8-bit cache (x=16, float8_e4m3fn or int8;
    uint8 is read as e4m3fn bits) -> a new shuffled cache of ``dtype`` (bf16/fp16: x=8,
    fp32: x=4). Scales are per-token ``[num_blocks, num_kv_heads, block_size]`` or
    1-element, fp32."""
    check_tensor(K, "K")
    check_tensor(V, "V")
    check_dtype(K, QUANT_DTYPES + (torch.uint8,), "K")
    if K.dtype == torch.uint8:
        K = K.view(torch.float8_e4m3fn)
        V = V.view(torch.float8_e4m3fn) if isinstance(V, torch.Tensor) and V.dtype == torch.uint8 else V
    num_blocks, num_kv_heads, head_size, block_size, _ = shuffled_geometry(K, V)
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"dtype: expected bfloat16, float16 or float32, got {dtype!r}")
    x = x_for(dtype)
    k, v = _token_major(K, V)
    result = []
    for name, t, s in (("k_scale", k, k_scale), ("v_scale", v, v_scale)):
        check_tensor(s, name)
        check_dtype(s, torch.float32, name)
        check_device_match(s, K, name, "K")
        if s.numel() == 1:
            result.append(t * s.reshape(()))
        else:
            check_shape(s, (num_blocks, num_kv_heads, block_size), name, "[num_blocks, num_kv_heads, block_size] or 1 element")
            result.append(t * s.permute(0, 2, 1)[..., None])
    return _shuffled_from_token_major(result[0].to(dtype), result[1].to(dtype), x)


def quantize_values(real: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``round(clamp(real / scale, -qmax, qmax))`` in ``dtype`` (``real`` fp32, ``scale``
    an fp32 tensor broadcasting against it)."""
    qmax = qmax_for(dtype)
    q = (real / scale).clamp_(-qmax, qmax)
    if dtype == torch.int8:
        magnitude = q.abs()
        whole = magnitude.floor()
        rounded = whole + (magnitude - whole >= 0.5).to(whole.dtype)  # the fraction is exact
        q = torch.where(q < 0, -rounded, rounded)
    return q.to(dtype)


def _scale_from_amax(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    scale = amax / torch.full_like(amax, qmax)  # a tensor divisor: an IEEE division on every device
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def _token_major(K: torch.Tensor, V: torch.Tensor):
    """Shuffled K/V -> fp32 ``[num_blocks, block_size, num_kv_heads, head_size]`` each."""
    num_blocks, num_kv_heads, d_over_x, block_size, x = K.shape
    head_size = d_over_x * x
    # K[b, h, d // x, t, d % x]; V[b, h, t // x, d, t % x]
    k = K.permute(0, 3, 1, 2, 4).reshape(num_blocks, block_size, num_kv_heads, head_size)
    v = V.permute(0, 2, 4, 1, 3).reshape(num_blocks, block_size, num_kv_heads, head_size)
    return k.to(torch.float32), v.to(torch.float32)


def _shuffled_from_token_major(k: torch.Tensor, v: torch.Tensor, x: int):
    """``[num_blocks, block_size, num_kv_heads, head_size]`` -> new shuffled K, V with ``x``."""
    num_blocks, block_size, num_kv_heads, head_size = k.shape
    K = k.reshape(num_blocks, block_size, num_kv_heads, head_size // x, x).permute(0, 2, 3, 1, 4)
    V = v.reshape(num_blocks, block_size // x, x, num_kv_heads, head_size).permute(0, 3, 1, 4, 2)
    return K.contiguous(), V.contiguous()
