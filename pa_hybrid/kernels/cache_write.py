"""Write new tokens into the paged KV cache (``reshape_and_cache`` and its quantizing variants).

For token ``t`` with ``slot = slot_mapping[t]`` (skipped unless ``0 <= slot < num_blocks * block_size``:
negative slots are padding, larger ones would write past the cache),
``block = slot // block_size`` and ``offset = slot % block_size``, every kv head ``h``
and dim ``d``:

* K (shuffled): ``K[block, h, d // x, offset, d % x] = enc_k(key[t, h, d])``
* V (shuffled): ``V[block, h, offset // x, d, offset % x] = enc_v(value[t, h, d])``
* V (vLLM):     ``V[block, h, d, offset] = enc_v(value[t, h, d])``

with ``enc`` one of (``QMAX`` = 448 for fp8 e4m3fn, 127 for int8):

* ``QUANT_NONE``: a plain copy (cache dtype = input dtype).
* ``QUANT_PER_TENSOR``: ``round(clamp(v / s, -QMAX, QMAX))`` with ``s`` a 1-element
  fp32 device tensor (1.0 when absent).
* ``QUANT_PER_TOKEN``: ``s = amax_d |v[t, h, :]| / QMAX`` (1.0 for an all-zero
  vector), the same encoding, and ``s`` written to ``scales[block, h, offset]``
  (dequantization: ``real = stored * s``).

``round`` is round-to-nearest-even for fp8 (the hardware conversion) and
round-half-away-from-zero for int8 (``sign(v) (floor(|v|) + (frac(|v|) >= 0.5))``, exact: with
``floor(|v| + 0.5)`` the sum rounds values just below a half up). Divisions are
correctly rounded (``_divide``), so results equal a plain torch computation bit for bit.

Performance. One program per (tile of ``TILE_T`` consecutive token indices, kv head)
writes K and V. Reading the tokens is coalesced either way; the writes depend on
the slots. In prefill the ``TILE_T`` tokens of a tile usually fill an aligned run
of one block: the kernel detects that at run time and then addresses the cache
from one scalar base plus a static pattern, which lets Triton emit 16-byte
vector stores along the token axis of V (``x`` consecutive tokens share a 16-byte
vector there), after an in-register transpose. Any other tile (decode, ragged
tails, padding) takes the general path, which addresses every token on its own:
K still gets 16-byte stores (``x`` dims of one token are contiguous), V gets
element stores.

Measured on an H100 (64k tokens x 8 kv heads x 128 dims, block size 16, bytes read +
written against a torch device copy, ``benchmarks/bench_cache_write.py``): prefill
slots (whole blocks in random order) bf16 copy ~91%, fp8 per-tensor ~80%, fp8
per-token ~89%, int8 per-token ~80%. Fully random slots reach only 9-13%: one token
then touches 128 different 16-byte vectors of V (and x tokens share each), so the
memory system moves whole sectors for 1-2 useful bytes; that is the layout's cost
for single-token writes (decode writes few tokens per step).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import interpreting, k_tile_offset, v_tile_offset

QUANT_NONE, QUANT_PER_TENSOR, QUANT_PER_TOKEN = 0, 1, 2
V_SHUFFLED, V_VLLM = 0, 1

FP8_E4M3_MAX = 448.0
INT8_MAX = 127.0
MIN_FAST_DIVISOR = tl.constexpr(2.0**-64)  # the smallest scale whose reciprocal _divide may use


@triton.jit
def _round_to_e4m3_grid(v):
    """``v`` (fp32, ``|v| <= 448``) rounded to the nearest e4m3fn value, ties to even,
    still in fp32 (so the final conversion is exact).

    Only used under Triton's CPU interpreter, whose fp32 -> fp8 conversion (Triton
    3.9) drops the carry when rounding up across a power of two (124 -> 64). The
    spacing of e4m3 values in the binade of ``v`` is ``ulp = 2^(max(e, -6) - 3)``;
    ``v / ulp`` lies in (-16, 16), where adding and subtracting 1.5 * 2^23 rounds an
    fp32 to an integer, ties to even.
    """
    bits = v.to(tl.int32, bitcast=True)
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    ulp = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
    inv_ulp = ((127 - exponent + 3) << 23).to(tl.float32, bitcast=True)
    rounded = ((v * inv_ulp + 12582912.0) - 12582912.0) * ulp
    return tl.where(bits < 0, tl.abs(rounded) * -1.0, tl.abs(rounded))  # v's sign bit: -0.0 stays -0.0, as in torch


@triton.jit
def _divide(a, b):
    """``a / b`` correctly rounded (bit-equal to torch's ``a / b``) for ``b >= 2^-64``
    (so ``1 / b`` is finite) and a finite quotient.

    With ``inv = RN(1 / b)``, ``q = RN(a inv)`` is within an ulp of ``a / b``, the FMA
    residual ``q b - a`` is exact and ``RN(q - (q b - a) inv)`` is the correctly
    rounded quotient (Markstein's theorem). Three flops per element instead of
    ``div_rn``'s long sequence: per-token quantization was limited by division on an
    H100. ``b`` is one scale per token (or per tensor), so the reciprocal is cheap.
    The residual is formed as ``q b - a`` (not ``a - q b``) so that ``-0.0 / b`` stays
    ``-0.0``; negations are products with -1 because Triton compiles ``-x`` as ``0 - x``,
    which turns +0.0 into +0.0.
    """
    inv = tl.math.div_rn(tl.full(b.shape, 1.0, tl.float32), b)
    q = a * inv
    residual = tl.fma(q, b, a * -1.0)
    return tl.fma(residual * -1.0, inv, q)


@triton.jit
def _encode(q, QMAX: tl.constexpr, TO_INT8: tl.constexpr, SOFTWARE_FP8: tl.constexpr, out_dtype):
    """``round(clamp(q, -QMAX, QMAX))`` converted to ``out_dtype`` (``q = v / scale``, fp32)."""
    q = tl.minimum(tl.maximum(q, -QMAX), QMAX)
    if TO_INT8:
        # .to(int8) truncates toward zero: round half away from zero first
        magnitude = tl.abs(q)
        whole = tl.floor(magnitude)
        rounded = whole + tl.where(magnitude - whole >= 0.5, 1.0, 0.0)  # the fraction is exact
        q = tl.where(q < 0, -rounded, rounded)
    elif SOFTWARE_FP8:
        q = _round_to_e4m3_grid(q)
    return q.to(out_dtype)


@triton.jit
def _write_one(
    src_ptr,  # [num_tokens, num_kv_heads, head_size], last dim contiguous
    cache_ptr,
    scale_ptr,  # per tensor: the 1-element quantization scale (read)
    dequant_ptr,  # per token: [num_blocks, num_kv_heads, block_size] fp32 (written)
    stride_src_token,
    stride_src_head,
    stride_cache_block,
    stride_cache_head,
    stride_dequant_block,
    stride_dequant_head,
    head,
    tokens,  # [TILE_T] token indices of this tile
    i,  # arange(TILE_T)
    valid,  # [TILE_T] token in range and slot >= 0
    block,  # [TILE_T] int64 (0 where not valid)
    offset,  # [TILE_T] offset inside the block
    fast,  # scalar: the tile fills slots [first, first + TILE_T) of one block
    first_block,
    first_offset,
    dims,
    dim_ok,
    LAYOUT: tl.constexpr,  # 0: shuffled K, 1: shuffled V, 2: vLLM V
    QUANT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    QMAX: tl.constexpr,
    TO_INT8: tl.constexpr,
    SOFTWARE_FP8: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    X: tl.constexpr,
):
    """Encode and store one of K/V for the tile (see the module docstring)."""
    mask = valid[:, None] & dim_ok[None, :]
    src = src_ptr + head * stride_src_head
    tile = tl.load(src + tokens.to(tl.int64)[:, None] * stride_src_token + dims[None, :], mask=mask, other=0.0)
    out_dtype = cache_ptr.dtype.element_ty
    if QUANT == 0:
        stored = tile.to(out_dtype)
    elif QUANT == 1:
        q = tile.to(tl.float32)
        if HAS_SCALE:
            scale = tl.load(scale_ptr)
            if scale >= MIN_FAST_DIVISOR:
                # |v| beyond 2 QMAX s encodes as +-QMAX either way; limiting it keeps v / s finite
                limit = 2 * QMAX * scale
                q = _divide(tl.minimum(tl.maximum(q, -limit), limit), scale)
            else:
                q = tl.math.div_rn(q, tl.broadcast_to(scale, q.shape))
        stored = _encode(q, QMAX, TO_INT8, SOFTWARE_FP8, out_dtype)
    else:
        tile = tile.to(tl.float32)
        amax = tl.max(tl.abs(tile), axis=1)
        token_scale = tl.where(amax > 0, tl.math.div_rn(amax, tl.full(amax.shape, QMAX, tl.float32)), 1.0)
        if tl.min(token_scale, axis=0) >= MIN_FAST_DIVISOR:
            q = _divide(tile, token_scale[:, None])  # |q| <= QMAX: no overflow
        else:  # a vector below ~1e-17: rare, exact the slow way
            q = tl.math.div_rn(tile, tl.broadcast_to(token_scale[:, None], tile.shape))
        stored = _encode(q, QMAX, TO_INT8, SOFTWARE_FP8, out_dtype)

    cache = cache_ptr + head * stride_cache_head
    if fast:
        # one scalar base + a static pattern: Triton sees x-aligned contiguous runs
        # (tokens for V, dims for K) and vectorizes the stores
        if LAYOUT == 0:
            base = first_block * stride_cache_block + first_offset * X
            pattern = k_tile_offset(i[:, None], dims[None, :], BLOCK_SIZE, X)
        elif LAYOUT == 1:
            base = first_block * stride_cache_block + (first_offset // X) * (HEAD_SIZE * X)
            pattern = v_tile_offset(i[:, None], dims[None, :], HEAD_SIZE, BLOCK_SIZE, X)
        else:
            base = first_block * stride_cache_block + first_offset
            pattern = dims[None, :] * BLOCK_SIZE + i[:, None]
        base = tl.multiple_of(base, X)
        tl.store(cache + base + pattern, stored, mask=dim_ok[None, :])
    else:
        block_base = block[:, None] * stride_cache_block
        if LAYOUT == 0:
            where = k_tile_offset(offset[:, None], dims[None, :], BLOCK_SIZE, X)
        elif LAYOUT == 1:
            where = v_tile_offset(offset[:, None], dims[None, :], HEAD_SIZE, BLOCK_SIZE, X)
        else:
            where = dims[None, :] * BLOCK_SIZE + offset[:, None]
        tl.store(cache + block_base + where, stored, mask=mask)

    if QUANT == 2:
        dequant = dequant_ptr + head * stride_dequant_head
        tl.store(dequant + block * stride_dequant_block + offset, token_scale, mask=valid)


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_mapping_ptr,  # [num_tokens] int32/int64
    k_scale_ptr,  # QUANT_PER_TENSOR: 1-element fp32 (when HAS_SCALE)
    v_scale_ptr,
    k_dequant_ptr,  # QUANT_PER_TOKEN: [num_blocks, num_kv_heads, block_size] fp32
    v_dequant_ptr,
    num_tokens,
    num_slots,  # num_blocks * block_size
    stride_key_token,
    stride_key_head,
    stride_value_token,
    stride_value_head,
    stride_kc_block,
    stride_kc_head,
    stride_vc_block,
    stride_vc_head,
    stride_ks_block,
    stride_ks_head,
    stride_vs_block,
    stride_vs_head,
    HEAD_SIZE: tl.constexpr,
    HEAD_SIZE_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    X: tl.constexpr,
    TILE_T: tl.constexpr,  # a power of two dividing BLOCK_SIZE, multiple of X
    QUANT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    QMAX: tl.constexpr,
    TO_INT8: tl.constexpr,
    SOFTWARE_FP8: tl.constexpr,
    V_LAYOUT: tl.constexpr,
    FAST_PATH: tl.constexpr,  # cache block/head strides are multiples of X
):
    """Write K and V of tokens ``[pid0 * TILE_T, (pid0 + 1) * TILE_T)`` for kv head ``pid1``
    (math in the module docstring)."""
    tile = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    i = tl.arange(0, TILE_T)
    first_token = tile * TILE_T
    tokens = first_token + i
    slots = tl.load(slot_mapping_ptr + tokens, mask=tokens < num_tokens, other=-1).to(tl.int64)
    valid = (slots >= 0) & (slots < num_slots)
    safe_slots = tl.where(valid, slots, 0)
    block = safe_slots // BLOCK_SIZE
    offset = safe_slots % BLOCK_SIZE
    dims = tl.arange(0, HEAD_SIZE_PAD)
    dim_ok = dims < HEAD_SIZE

    first = tl.load(slot_mapping_ptr + first_token).to(tl.int64)
    if FAST_PATH:
        # TILE_T divides BLOCK_SIZE, so an aligned run of TILE_T slots stays in one block
        breaks = tl.sum((slots != first + i).to(tl.int32), axis=0)
        fast = (first >= 0) & (first < num_slots) & (first % TILE_T == 0) & (breaks == 0)
    else:
        fast = first != first  # never; a runtime scalar like the other branch
    first = tl.maximum(first, 0)
    first_block = first // BLOCK_SIZE
    first_offset = first % BLOCK_SIZE

    _write_one(key_ptr, key_cache_ptr, k_scale_ptr, k_dequant_ptr,
               stride_key_token, stride_key_head, stride_kc_block, stride_kc_head, stride_ks_block, stride_ks_head,
               head, tokens, i, valid, block, offset, fast, first_block, first_offset, dims, dim_ok,
               0, QUANT, HAS_SCALE, QMAX, TO_INT8, SOFTWARE_FP8, HEAD_SIZE, BLOCK_SIZE, X)  # fmt: skip
    _write_one(value_ptr, value_cache_ptr, v_scale_ptr, v_dequant_ptr,
               stride_value_token, stride_value_head, stride_vc_block, stride_vc_head, stride_vs_block, stride_vs_head,
               head, tokens, i, valid, block, offset, fast, first_block, first_offset, dims, dim_ok,
               1 + V_LAYOUT, QUANT, HAS_SCALE, QMAX, TO_INT8, SOFTWARE_FP8, HEAD_SIZE, BLOCK_SIZE, X)  # fmt: skip


def tile_tokens(block_size: int, x: int, max_tile: int = 16) -> int:
    """Tokens per program: the largest power of two dividing ``block_size``, at most
    ``max_tile`` but at least ``x`` (one 16-byte vector of V)."""
    tile = block_size & -block_size
    return max(x, min(tile, max_tile))


def warps_for(tile: int, head_size_pad: int, quant: int) -> int:
    """Warps per program: about 1024 elements of a K (or V) tile per warp for per-token
    quantization (which does the most arithmetic per element) and 512 otherwise, 1 to 4
    (measured on an H100 for 16 x 128 tiles: per-token 2 warps ~10% faster than 4;
    plain and per-tensor 4 warps, 8 slower)."""
    per_warp = 1024 if quant == QUANT_PER_TOKEN else 512
    return max(1, min(4, tile * head_size_pad // per_warp))


def launch_reshape_and_cache(
    key,
    value,
    key_cache,
    value_cache,
    slot_mapping,
    *,
    quant: int,
    k_scale=None,
    v_scale=None,
    k_dequant=None,
    v_dequant=None,
    v_layout: int = V_SHUFFLED,
    max_tile: int = 16,
    num_warps: int | None = None,
):
    """Launch the kernel on validated arguments (``cache.py`` checks them).

    ``key_cache``/``value_cache`` are given in their logical dtype (uint8 already
    viewed as e4m3fn). ``k_scale``/``v_scale``: per-tensor quantization scales or
    None (1.0); ``k_dequant``/``v_dequant``: per-token scale outputs.
    """
    num_tokens, num_kv_heads, head_size = key.shape
    if num_tokens == 0 or num_kv_heads == 0:
        return
    block_size = key_cache.shape[3]
    x = key_cache.shape[4]
    cache_dtype = key_cache.dtype
    to_int8 = cache_dtype == torch.int8
    qmax = INT8_MAX if to_int8 else FP8_E4M3_MAX
    tile = tile_tokens(block_size, x, max_tile)
    if num_warps is None:
        num_warps = warps_for(tile, triton.next_power_of_2(head_size), quant)
    fast_path = all(s % x == 0 for s in key_cache.stride()[:2] + value_cache.stride()[:2])
    has_scale = quant == QUANT_PER_TENSOR and k_scale is not None
    # unused pointer slots get any tensor of the call
    k_scale_arg = k_scale if has_scale else slot_mapping
    v_scale_arg = v_scale if has_scale else slot_mapping
    per_token = quant == QUANT_PER_TOKEN
    k_dequant_arg = k_dequant if per_token else slot_mapping
    v_dequant_arg = v_dequant if per_token else slot_mapping
    ks_strides = k_dequant.stride()[:2] if per_token else (0, 0)
    vs_strides = v_dequant.stride()[:2] if per_token else (0, 0)
    grid = (triton.cdiv(num_tokens, tile), num_kv_heads)
    _reshape_and_cache_kernel[grid](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        k_scale_arg,
        v_scale_arg,
        k_dequant_arg,
        v_dequant_arg,
        num_tokens,
        key_cache.shape[0] * block_size,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        value_cache.stride(0),
        value_cache.stride(1),
        *ks_strides,
        *vs_strides,
        HEAD_SIZE=head_size,
        HEAD_SIZE_PAD=triton.next_power_of_2(head_size),
        BLOCK_SIZE=block_size,
        X=x,
        TILE_T=tile,
        QUANT=quant,
        HAS_SCALE=has_scale,
        QMAX=qmax,
        TO_INT8=to_int8,
        SOFTWARE_FP8=interpreting() and cache_dtype == torch.float8_e4m3fn,
        V_LAYOUT=v_layout,
        FAST_PATH=fast_path,
        num_warps=num_warps,
    )
