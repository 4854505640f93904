"""Write new tokens into the shuffled (or vLLM) KV cache, optionally quantizing.

``key``/``value``: ``[num_tokens, num_kv_heads, head_size]`` bf16/fp16, any strides
with a contiguous last dim (e.g. slices of a fused QKV tensor).
``slot_mapping``: ``[num_tokens]`` int32/int64, ``slot = block * block_size + offset``;
a negative slot marks a padding token, which is skipped. Slots must be distinct (two
tokens for one slot race).

Cache layouts (``x = 16 // element_size(cache dtype)``):

* ``asm_layout=True``: K ``[num_blocks, num_kv_heads, head_size // x, block_size, x]``,
  V ``[num_blocks, num_kv_heads, block_size // x, head_size, x]``.
* ``asm_layout=False`` (vLLM): the same K, V ``[num_blocks, num_kv_heads, head_size, block_size]``.

The last three (vLLM V: two) dims of a cache must be contiguous; block and head
strides are free. Both functions launch one Triton kernel (``kernels/cache_write.py``),
by default never read device memory on the host (no synchronization: CUDA-graph
capturable) and check only metadata. The kernel skips slots ``>= num_blocks * block_size``
like padding, so a bad slot never writes out of bounds; ``validate="full"`` (one host round
trip) raises a ``ValueError`` for such slots and for repeated ones instead.
"""

from __future__ import annotations

import torch

from ._checks import (
    check_device_match,
    check_distinct_outputs,
    check_dtype,
    check_last_dim_contiguous,
    check_rank,
    check_shape,
    check_tensor,
    check_validate,
)
from .kernels.cache_write import (
    QUANT_NONE,
    QUANT_PER_TENSOR,
    QUANT_PER_TOKEN,
    V_SHUFFLED,
    V_VLLM,
    launch_reshape_and_cache,
)
from .layouts import _inner_contiguous, check_kernel_device, resolve_kv_dtype, x_for

_TOKENS = "[num_tokens, num_kv_heads, head_size]"
_INPUT_DTYPES = (torch.bfloat16, torch.float16)


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_cache_dtype: str = "auto",
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    asm_layout: bool = True,
    validate: str = "shapes",
) -> None:
    """Store ``key``/``value`` at ``slot_mapping`` in ``key_cache``/``value_cache`` (in place).

    ``kv_cache_dtype``: "auto" copies (the caches have the dtype of ``key``);
    "fp8"/"fp8_e4m3" quantize per tensor into a float8_e4m3fn cache (or a uint8/int8
    tensor holding e4m3fn bits), "int8" into an int8 cache:
    ``stored = round(clamp(real / k_scale, -qmax, qmax))`` (qmax 448 for fp8, 127 for
    int8; fp8 rounds to nearest even, int8 half away from zero). ``k_scale``/``v_scale``
    are 1-element fp32 device tensors (None means 1.0); a 16-bit cache ignores them.
    ``validate``: "shapes" (metadata only) or "full" (also the slots' values, see the module doc).
    """
    _check_tokens(key, value, slot_mapping, validate)
    if not isinstance(kv_cache_dtype, str):
        raise TypeError(f"kv_cache_dtype: expected a str, got {type(kv_cache_dtype).__name__}")
    check_tensor(key_cache, "key_cache")
    if kv_cache_dtype == "auto":
        if key_cache.dtype != key.dtype:
            raise TypeError(
                f"key_cache: kv_cache_dtype='auto' expects a cache of the dtype of key ({key.dtype}), "
                f"got {key_cache.dtype} (pass kv_cache_dtype='fp8' or 'int8' to quantize)"
            )
        cache_dtype, quant = key.dtype, QUANT_NONE
    else:
        try:
            cache_dtype = resolve_kv_dtype(key_cache.dtype, kv_cache_dtype)
        except (TypeError, ValueError) as e:
            raise type(e)(f"key_cache: {e}") from None
        if cache_dtype not in (torch.float8_e4m3fn, torch.int8):
            raise TypeError(
                f"key_cache: kv_cache_dtype={kv_cache_dtype!r} needs a float8_e4m3fn, int8 or uint8 cache "
                f"for quantization here, got {key_cache.dtype}"
            )
        quant = QUANT_PER_TENSOR
    key_cache, value_cache = _check_caches(key, key_cache, value_cache, cache_dtype, asm_layout)
    check_distinct_outputs({"key_cache": key_cache, "value_cache": value_cache})
    if quant == QUANT_PER_TENSOR:
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            _check_scalar_scale(s, name, key)
        if (k_scale is None) != (v_scale is None):
            raise ValueError("k_scale, v_scale: pass both or neither (None means 1.0)")
    if validate == "full":
        _check_slot_values(slot_mapping, key_cache)
    check_kernel_device(key, "key")
    launch_reshape_and_cache(
        key, value, key_cache, value_cache, slot_mapping,
        quant=quant, k_scale=k_scale, v_scale=v_scale, v_layout=V_SHUFFLED if asm_layout else V_VLLM,
    )  # fmt: skip


def reshape_and_cache_with_pertoken_quant(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    k_dequant_scales: torch.Tensor,
    v_dequant_scales: torch.Tensor,
    slot_mapping: torch.Tensor,
    asm_layout: bool = True,
    validate: str = "shapes",
) -> None:
    """Quantize each (token, kv head) vector symmetrically and store it (in place).

    For token ``t`` (slot ``block * block_size + offset``) and kv head ``h``:
    ``s = max_d |key[t, h, d]| / qmax`` (1.0 for an all-zero vector),
    ``key_cache <- round(clamp(key / s, -qmax, qmax))`` and
    ``k_dequant_scales[block, h, offset] = s``; likewise V. The cache dtype decides:
    float8_e4m3fn (or uint8 holding its bits; qmax 448, round to nearest even) or
    int8 (qmax 127, round half away from zero). ``*_dequant_scales``:
    ``[num_blocks, num_kv_heads, block_size]`` fp32, last dim contiguous. ``validate`` as in
    ``reshape_and_cache``.
    """
    _check_tokens(key, value, slot_mapping, validate)
    check_tensor(key_cache, "key_cache")
    if key_cache.dtype not in (torch.float8_e4m3fn, torch.int8, torch.uint8):
        raise TypeError(
            f"key_cache: per-token quantization needs a float8_e4m3fn, int8 or uint8 (e4m3fn bits) cache, "
            f"got {key_cache.dtype}"
        )
    cache_dtype = torch.int8 if key_cache.dtype == torch.int8 else torch.float8_e4m3fn
    key_cache, value_cache = _check_caches(key, key_cache, value_cache, cache_dtype, asm_layout)
    num_blocks, num_kv_heads, _, block_size, _ = key_cache.shape
    expected = (num_blocks, num_kv_heads, block_size)
    for name, s in (("k_dequant_scales", k_dequant_scales), ("v_dequant_scales", v_dequant_scales)):
        check_shape(s, expected, name, "[num_blocks, num_kv_heads, block_size]")
        check_dtype(s, torch.float32, name)
        check_last_dim_contiguous(s, name)
        check_device_match(s, key, name, "key")
    check_distinct_outputs(
        {"key_cache": key_cache, "value_cache": value_cache, "k_dequant_scales": k_dequant_scales,
         "v_dequant_scales": v_dequant_scales}
    )  # fmt: skip
    if validate == "full":
        _check_slot_values(slot_mapping, key_cache)
    check_kernel_device(key, "key")
    launch_reshape_and_cache(
        key, value, key_cache, value_cache, slot_mapping,
        quant=QUANT_PER_TOKEN, k_dequant=k_dequant_scales, v_dequant=v_dequant_scales,
        v_layout=V_SHUFFLED if asm_layout else V_VLLM,
    )  # fmt: skip


# --------------------------------------------------------------------------- #
# checks (metadata only)
# --------------------------------------------------------------------------- #


def _check_tokens(key, value, slot_mapping, validate):
    check_validate(validate)
    check_rank(key, 3, "key", _TOKENS)
    check_rank(value, 3, "value", _TOKENS)
    check_dtype(key, _INPUT_DTYPES, "key")
    if value.dtype != key.dtype:
        raise TypeError(f"value: expected the dtype of key ({key.dtype}), got {value.dtype}")
    check_shape(value, key.shape, "value", f"{_TOKENS} (the shape of key)")
    check_device_match(value, key, "value", "key")
    check_last_dim_contiguous(key, "key")
    check_last_dim_contiguous(value, "value")
    check_rank(slot_mapping, 1, "slot_mapping", "[num_tokens]")
    check_dtype(slot_mapping, (torch.int32, torch.int64), "slot_mapping")
    if slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(
            f"slot_mapping: expected one slot per token ({key.shape[0]}, the first dim of key), "
            f"got shape {tuple(slot_mapping.shape)}"
        )
    check_device_match(slot_mapping, key, "slot_mapping", "key")
    if slot_mapping.shape[0] > 1 and slot_mapping.stride(0) != 1:
        raise ValueError(f"slot_mapping: must be contiguous, got stride {slot_mapping.stride()}")


def _check_caches(key, key_cache, value_cache, cache_dtype, asm_layout):
    """Shapes/dtypes/devices of the caches against ``key``; returns them viewed as ``cache_dtype``."""
    if not isinstance(asm_layout, bool):
        raise TypeError(f"asm_layout: expected a bool, got {type(asm_layout).__name__}")
    _, num_kv_heads, head_size = key.shape
    x = x_for(cache_dtype)
    k_layout = "[num_blocks, num_kv_heads, head_size // x, block_size, x]"
    v_layout = ("[num_blocks, num_kv_heads, block_size // x, head_size, x]" if asm_layout
                else "[num_blocks, num_kv_heads, head_size, block_size]")  # fmt: skip
    check_rank(key_cache, 5, "key_cache", k_layout)
    check_rank(value_cache, 5 if asm_layout else 4, "value_cache", v_layout)
    if value_cache.dtype != key_cache.dtype:
        raise TypeError(f"value_cache: expected the dtype of key_cache ({key_cache.dtype}), got {value_cache.dtype}")
    check_device_match(key_cache, key, "key_cache", "key")
    check_device_match(value_cache, key, "value_cache", "key")
    if head_size % x:
        raise ValueError(f"key: head_size must be divisible by x={x} for a {cache_dtype} cache, got {head_size}")
    num_blocks, _, _, block_size, _ = key_cache.shape
    if block_size % x:
        raise ValueError(
            f"key_cache: block_size must be divisible by x={x} for a {cache_dtype} cache, "
            f"got shape {tuple(key_cache.shape)} {k_layout}"
        )
    check_shape(key_cache, (num_blocks, num_kv_heads, head_size // x, block_size, x), "key_cache",
                f"{k_layout} with x={x}, num_kv_heads and head_size of key")  # fmt: skip
    if asm_layout:
        expected_v = (num_blocks, num_kv_heads, block_size // x, head_size, x)
    else:
        expected_v = (num_blocks, num_kv_heads, head_size, block_size)
    check_shape(value_cache, expected_v, "value_cache", f"{v_layout} matching key_cache")
    for name, t, inner in (("key_cache", key_cache, 3), ("value_cache", value_cache, 3 if asm_layout else 2)):
        if not _inner_contiguous(t, inner):
            raise ValueError(
                f"{name}: the last {inner} dims must be contiguous (block and head strides may be anything), "
                f"got strides {t.stride()} for shape {tuple(t.shape)}"
            )
    return key_cache.view(cache_dtype), value_cache.view(cache_dtype)


def _check_slot_values(slot_mapping, key_cache):
    """The opt-in device-data check (``validate="full"``): one host round trip."""
    num_slots = key_cache.shape[0] * key_cache.shape[3]
    slots = slot_mapping.cpu()
    past = slots[slots >= num_slots]
    if past.numel():
        raise ValueError(
            f"slot_mapping: slots must be below num_blocks * block_size = {num_slots} "
            f"(negative for padding), got {past.tolist()[:8]}"
        )
    used, counts = torch.unique(slots[slots >= 0], return_counts=True)
    if bool((counts > 1).any()):
        raise ValueError(f"slot_mapping: slots must be distinct, repeated: {used[counts > 1].tolist()[:8]}")


def _check_scalar_scale(scale, name, key):
    if scale is None:
        return
    check_tensor(scale, name)
    if scale.numel() != 1:
        raise ValueError(f"{name}: expected a 1-element tensor (per-tensor scale), got shape {tuple(scale.shape)}")
    check_dtype(scale, torch.float32, name)
    check_device_match(scale, key, name, "key")
