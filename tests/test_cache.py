"""Cache writes (cache.py, kernels/cache_write.py) against a plain-torch writer.

The torch writer below scatters the encoded tokens with advanced indexing:
``K[block, :, :, offset, :]``, ``V[block, :, offset // x, :, offset % x]`` (shuffled)
or ``V[block, :, :, offset]`` (vLLM). Caches start with random bits, so the tests
also see that nothing outside the written slots changes. Slot mappings are ragged:
sequences starting at block boundaries and mid-block in random non-contiguous
blocks, single decode tokens, and -1 padding.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pa_hybrid.cache import reshape_and_cache, reshape_and_cache_with_pertoken_quant
from pa_hybrid.testing import round_half_away_from_zero

QMAX = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}
HYPOTHESIS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def rand_int(lo, hi):
    """Uniform in [lo, hi] from torch's (seeded) generator."""
    return int(torch.randint(lo, hi + 1, ()).item())


def x_of(dtype):
    return 16 // torch.empty((), dtype=dtype).element_size()


def random_bits(shape, dtype, device):
    size = torch.empty((), dtype=dtype).element_size()
    if size == 1:
        return torch.randint(0, 256, shape, dtype=torch.uint8, device=device).view(dtype)
    return torch.randint(-(2**15), 2**15, shape, dtype=torch.int16, device=device).view(dtype)


def bits(t):
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


# inputs ------------------------------------------------------------------------ #


def make_tokens(num_tokens, num_kv_heads, head_size, dtype, device, strided=True):
    """Random key/value; ``strided``: slices of one fused ``[T, (q + k + v) heads, D]`` tensor."""
    if strided:
        fused = torch.randn(num_tokens, 4 * num_kv_heads, head_size, device=device).to(dtype)
        return fused[:, 2 * num_kv_heads : 3 * num_kv_heads], fused[:, 3 * num_kv_heads :]
    key = torch.randn(num_tokens, num_kv_heads, head_size, device=device).to(dtype)
    return key, torch.randn(num_tokens, num_kv_heads, head_size, device=device).to(dtype)


def make_caches(num_blocks, num_kv_heads, head_size, block_size, dtype, device, asm_layout=True, shared=False):
    """Random-bit caches; ``shared``: K and V are the two halves of one allocation
    (block stride twice the block's size)."""
    x = x_of(dtype)
    k_shape = (num_blocks, num_kv_heads, head_size // x, block_size, x)
    v_shape = (num_blocks, num_kv_heads, block_size // x, head_size, x) if asm_layout else (
        num_blocks, num_kv_heads, head_size, block_size)  # fmt: skip
    if shared:
        kv = random_bits((num_blocks, 2, num_kv_heads * head_size * block_size), dtype, device)
        return kv[:, 0].unflatten(1, k_shape[1:]), kv[:, 1].unflatten(1, v_shape[1:])
    return random_bits(k_shape, dtype, device), random_bits(v_shape, dtype, device)


def ragged_slots(num_blocks, block_size, device, dtype=torch.int64, *, aligned=False, padding=True):
    """Prefill-like runs of consecutive slots in random distinct blocks (starting
    mid-block unless ``aligned``), single decode tokens and -1 padding."""
    blocks = torch.randperm(num_blocks).tolist()
    slots = []
    for _ in range(rand_int(1, 4)):
        start = 0 if aligned or rand_int(0, 1) else rand_int(1, block_size - 1)
        n = block_size * rand_int(1, 2) if aligned else rand_int(1, 2 * block_size + 3)
        need = -(-(start + n) // block_size)
        if need > len(blocks) - 2:
            break
        take, blocks = blocks[:need], blocks[need:]
        slots += [take[(start + i) // block_size] * block_size + (start + i) % block_size for i in range(n)]
    if not aligned:
        for b in blocks[: rand_int(1, 2)]:  # decode: one token into a block of its own
            slots.append(b * block_size + rand_int(0, block_size - 1))
    if padding:
        for _ in range(rand_int(1, 3)):
            slots.insert(rand_int(0, len(slots)), -1)
        slots.append(-1)
    return torch.tensor(slots, dtype=dtype, device=device)


# the plain-torch encoder and writer ---------------------------------------------- #


def encode(real, scale, dtype):
    """round(clamp(real / scale)) in ``dtype`` (``scale`` a tensor: an IEEE division)."""
    q = (real.float() / scale).clamp(-QMAX[dtype], QMAX[dtype])
    return (round_half_away_from_zero(q) if dtype == torch.int8 else q).to(dtype)


def per_token_encode(real, dtype):
    """(stored, scale[T, H]) with scale = amax / qmax (1 for a zero vector)."""
    amax = real.float().abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / torch.full_like(amax, QMAX[dtype]), torch.ones_like(amax))
    return encode(real, scale[..., None], dtype), scale


def torch_write(K, V, key, value, slots, asm_layout=True, k_scales=None, v_scales=None, token_scales=None):
    """Expected caches (copies): the already encoded ``key``/``value`` written at ``slots``."""
    K, V = bits(K).clone(), bits(V).clone()
    valid = slots >= 0
    s = slots[valid].long()
    block_size = K.shape[3]
    x = K.shape[4]
    b, o = s // block_size, s % block_size
    n, h, d = s.numel(), key.shape[1], key.shape[2]
    K[b, :, :, o, :] = bits(key[valid]).reshape(n, h, d // x, x)
    if asm_layout:
        V[b, :, o // x, :, o % x] = bits(value[valid])
    else:
        V[b, :, :, o] = bits(value[valid])
    scales = []
    if token_scales is not None:
        for cache, ts in ((k_scales, token_scales[0]), (v_scales, token_scales[1])):
            cache = cache.clone()
            cache[b, :, o] = ts[valid]
            scales.append(cache)
    return K, V, scales


def assert_same_bits(actual, expected):
    assert torch.equal(bits(actual), bits(expected))


# plain copies ----------------------------------------------------------------- #


@pytest.mark.parametrize("asm_layout", [True, False], ids=["asm", "vllm"])
@pytest.mark.parametrize("block_size,head_size", [(16, 64), (16, 128), (32, 64), (32, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_copy(dtype, block_size, head_size, asm_layout, device):
    num_blocks, heads = 12, 2
    slots = ragged_slots(num_blocks, block_size, device, torch.int32 if block_size == 32 else torch.int64)
    key, value = make_tokens(slots.numel(), heads, head_size, dtype, device, strided=head_size == 64)
    K, V = make_caches(num_blocks, heads, head_size, block_size, dtype, device, asm_layout)
    expected_k, expected_v, _ = torch_write(K, V, key, value, slots, asm_layout)
    reshape_and_cache(key, value, K, V, slots, "auto", asm_layout=asm_layout)
    assert_same_bits(K, expected_k)
    assert_same_bits(V, expected_v)


@pytest.mark.parametrize("head_size,block_size", [(256, 16), (96, 8), (40, 32)])
def test_copy_other_sizes(head_size, block_size, device):
    """head size 256, and head sizes/block sizes that are not powers of two... or small."""
    num_blocks, heads = 10, 3
    slots = ragged_slots(num_blocks, block_size, device)
    key, value = make_tokens(slots.numel(), heads, head_size, torch.bfloat16, device)
    K, V = make_caches(num_blocks, heads, head_size, block_size, torch.bfloat16, device)
    expected_k, expected_v, _ = torch_write(K, V, key, value, slots)
    reshape_and_cache(key, value, K, V, slots, "auto")
    assert_same_bits(K, expected_k)
    assert_same_bits(V, expected_v)


@pytest.mark.parametrize("asm_layout", [True, False], ids=["asm", "vllm"])
@pytest.mark.parametrize("shared", [False, True], ids=["separate", "shared-allocation"])
def test_aligned_prefill(shared, asm_layout, device):
    """Whole blocks filled in order (every tile takes the kernel's vectorized path), then
    the same with one slot moved (its tile falls back to the general path)."""
    num_blocks, heads, head_size, block_size = 8, 2, 64, 32
    slots = ragged_slots(num_blocks, block_size, device, aligned=True, padding=False)
    key, value = make_tokens(slots.numel(), heads, head_size, torch.bfloat16, device)
    for attempt in range(2):
        K, V = make_caches(num_blocks, heads, head_size, block_size, torch.bfloat16, device, asm_layout, shared)
        expected_k, expected_v, _ = torch_write(K, V, key, value, slots, asm_layout)
        reshape_and_cache(key, value, K, V, slots, "auto", asm_layout=asm_layout)
        assert_same_bits(K, expected_k)
        assert_same_bits(V, expected_v)
        slots[3] = -1  # second round: a broken tile


def test_unaligned_block_stride(device):
    """A block stride that is not a multiple of x: the kernel must not assume aligned vectors."""
    num_blocks, heads, head_size, block_size = 4, 2, 64, 16
    per_block = heads * head_size * block_size
    buf = random_bits((num_blocks * (per_block + 3),), torch.bfloat16, device)
    K = buf.as_strided((num_blocks, heads, head_size // 8, block_size, 8), (per_block + 3, head_size * block_size, 8 * block_size, 8, 1))
    V = random_bits((num_blocks, heads, block_size // 8, head_size, 8), torch.bfloat16, device)
    slots = torch.arange(num_blocks * block_size, device=device)
    key, value = make_tokens(slots.numel(), heads, head_size, torch.bfloat16, device)
    expected_k, expected_v, _ = torch_write(K, V, key, value, slots)
    reshape_and_cache(key, value, K, V, slots, "auto")
    assert_same_bits(K, expected_k)
    assert_same_bits(V, expected_v)


def test_no_tokens(device):
    K, V = make_caches(2, 2, 64, 16, torch.bfloat16, device)
    before = (K.clone(), V.clone())
    key = torch.randn(0, 2, 64, device=device).bfloat16()
    reshape_and_cache(key, key, K, V, torch.empty(0, dtype=torch.int64, device=device), "auto")
    assert_same_bits(K, before[0])
    assert_same_bits(V, before[1])


@pytest.mark.parametrize("per_token", [False, True], ids=["copy", "per-token-int8"])
def test_slots_past_the_cache_write_nothing(per_token, device, interpreter_bounds_check):
    """Slots >= num_blocks * block_size are skipped like padding: the caches are the first
    blocks of larger allocations whose last block must keep its bits, and far slots must
    not be addressed at all (the interpreter's bounds check, memcheck on a GPU). The first
    16 tokens are one aligned tile just past the cache (the kernel's vectorized path)."""
    num_blocks, heads, head_size, block_size = 4, 2, 64, 16
    num_slots = num_blocks * block_size
    cache_dtype = torch.int8 if per_token else torch.bfloat16
    K_all, V_all = make_caches(num_blocks + 1, heads, head_size, block_size, cache_dtype, device)
    K, V = K_all[:num_blocks], V_all[:num_blocks]
    slots = torch.cat([torch.arange(num_slots, num_slots + 16, device=device), ragged_slots(num_blocks, block_size, device)])
    past = torch.randperm(slots.numel() - 16)[:3] + 16
    slots[past[0]], slots[past[1]], slots[past[2]] = num_slots, num_slots + block_size - 1, 10**9
    key, value = make_tokens(slots.numel(), heads, head_size, torch.bfloat16, device)
    kept = torch.where(slots < num_slots, slots, -1)
    before = (bits(K_all[num_blocks]).clone(), bits(V_all[num_blocks]).clone())
    if per_token:
        scales_all = [torch.rand(num_blocks + 1, heads, block_size, device=device) + 1 for _ in range(2)]
        k_scales, v_scales = (s[:num_blocks] for s in scales_all)
        (key_enc, key_s), (value_enc, value_s) = per_token_encode(key, torch.int8), per_token_encode(value, torch.int8)
        expected_k, expected_v, expected_scales = torch_write(K, V, key_enc, value_enc, kept, True, k_scales, v_scales, (key_s, value_s))
        scales_before = [s[num_blocks].clone() for s in scales_all]
        reshape_and_cache_with_pertoken_quant(key, value, K, V, k_scales, v_scales, slots)
        for actual, expected, spare, spare_before in zip((k_scales, v_scales), expected_scales, scales_all, scales_before):
            torch.testing.assert_close(actual, expected, rtol=0, atol=0)
            torch.testing.assert_close(spare[num_blocks], spare_before, rtol=0, atol=0)
    else:
        expected_k, expected_v, _ = torch_write(K, V, key, value, kept)
        reshape_and_cache(key, value, K, V, slots, "auto")
    assert_same_bits(K, expected_k)
    assert_same_bits(V, expected_v)
    assert torch.equal(bits(K_all[num_blocks]), before[0]) and torch.equal(bits(V_all[num_blocks]), before[1])


# per-tensor quantization ----------------------------------------------------------- #


@pytest.mark.parametrize("with_scales", [True, False], ids=["scales", "no-scales"])
@pytest.mark.parametrize("asm_layout", [True, False], ids=["asm", "vllm"])
@pytest.mark.parametrize(
    "cache_dtype,kv_cache_dtype",
    [(torch.float8_e4m3fn, "fp8"), (torch.uint8, "fp8_e4m3"), (torch.int8, "int8")],
    ids=["fp8", "uint8-fp8", "int8"],
)
def test_per_tensor(cache_dtype, kv_cache_dtype, asm_layout, with_scales, device):
    logical = torch.int8 if cache_dtype == torch.int8 else torch.float8_e4m3fn
    num_blocks, heads, head_size, block_size = 8, 2, 64, 16
    slots = ragged_slots(num_blocks, block_size, device)
    key, value = make_tokens(slots.numel(), heads, head_size, torch.float16, device)
    key = key * 40  # beyond the code range for the smaller scales: exercises the clamp
    K, V = make_caches(num_blocks, heads, head_size, block_size, cache_dtype, device, asm_layout)
    if with_scales:
        k_scale = torch.rand(1, device=device) * 0.2 + 0.05
        v_scale = torch.rand(1, device=device) * 0.02 + 0.005
    else:
        k_scale = v_scale = None
    one = torch.ones(1, device=device)
    key_enc = encode(key, k_scale if with_scales else one, logical)
    value_enc = encode(value, v_scale if with_scales else one, logical)
    expected_k, expected_v, _ = torch_write(K, V, key_enc, value_enc, slots, asm_layout)
    reshape_and_cache(key, value, K, V, slots, kv_cache_dtype, k_scale, v_scale, asm_layout=asm_layout)
    assert_same_bits(K, expected_k)
    assert_same_bits(V, expected_v)


def test_fp8_rounding_across_powers_of_two(device):
    """Values just below a power of two that round up into the next binade (124 -> 128),
    exact ties (to even), subnormals and signed zeros encode like torch."""
    codes = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # all finite >= 0
    mids = (codes[:-1] + codes[1:]) / 2
    near = torch.cat([codes * (1 + 2**-5), codes * (1 - 2**-5), mids, mids * (1 + 2**-20), mids * (1 - 2**-20)])
    values = torch.cat([near, -near, torch.tensor([0.0, -0.0, 500.0, -1000.0])])
    values = values[torch.randperm(values.numel())]
    head_size, heads = 64, 1
    n = -(-values.numel() // head_size)
    padded = torch.cat([values, torch.ones(n * head_size - values.numel())])
    key = padded.reshape(n, heads, head_size).to(device=device, dtype=torch.float16)  # fp16 holds these values
    block_size = 16
    num_blocks = -(-n // block_size)
    K, V = make_caches(num_blocks, heads, head_size, block_size, torch.float8_e4m3fn, device)
    slots = torch.arange(n, device=device)
    reshape_and_cache(key, key, K, V, slots, "fp8")
    expected_k, expected_v, _ = torch_write(K, V, encode(key, torch.ones(1, device=device), torch.float8_e4m3fn),
                                            encode(key, torch.ones(1, device=device), torch.float8_e4m3fn), slots)  # fmt: skip
    assert_same_bits(K, expected_k)
    assert_same_bits(V, expected_v)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy, on purpose
@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.int8], ids=str)
def test_extreme_magnitudes(cache_dtype, device):
    """Tiny token vectors (whose scale amax / qmax is an fp32 subnormal: 1 / scale
    overflows), huge ones, and per-tensor scales that push values far beyond the code
    range encode like torch's IEEE division (no NaN). Values stay normal bf16 numbers:
    the interpreter (Triton 3.9) flushes bf16 subnormals to zero when widening."""
    heads, head_size, block_size = 1, 64, 16
    magnitudes = torch.tensor([2e-38, 1e-37, 1e-30, 1e-20, 1.0, 1e20, 1e35, 0.0])
    shape = (magnitudes.numel(), heads, head_size)
    signs = torch.randint(0, 2, shape) * 2 - 1
    key = (signs * (1 + torch.rand(shape)) * magnitudes[:, None, None]).to(device=device, dtype=torch.bfloat16)
    key[0, 0, 1:] = 0  # one tiny value next to zeros
    slots = torch.arange(key.shape[0], device=device)
    K, V = make_caches(1, heads, head_size, block_size, cache_dtype, device)
    k_scales = torch.zeros(1, heads, block_size, device=device)
    v_scales = torch.zeros_like(k_scales)
    reshape_and_cache_with_pertoken_quant(key, key, K, V, k_scales, v_scales, slots)
    key_enc, key_s = per_token_encode(key, cache_dtype)
    expected_k, expected_v, (expected_s, _) = torch_write(K, V, key_enc, key_enc, slots, True, k_scales, v_scales, (key_s, key_s))
    assert_same_bits(K, expected_k)
    assert_same_bits(V, expected_v)
    assert torch.equal(k_scales, expected_s) and torch.isfinite(k_scales).all()

    name = "int8" if cache_dtype == torch.int8 else "fp8"
    for scale in (1e-3, 1e-10, 1e-25, 3e-40):  # small per-tensor scales: most values clamp, zeros stay zero
        k_scale = torch.tensor([scale], device=device)
        K, V = make_caches(1, heads, head_size, block_size, cache_dtype, device)
        reshape_and_cache(key, key, K, V, slots, name, k_scale, k_scale)
        enc = encode(key, k_scale, cache_dtype)
        expected_k, expected_v, _ = torch_write(K, V, enc, enc, slots)
        assert_same_bits(K, expected_k)
        assert_same_bits(V, expected_v)


# per-token quantization ----------------------------------------------------------- #


def per_token_case(cache_dtype, block_size, head_size, asm_layout, device, num_blocks=8, heads=2, slots=None):
    logical = torch.int8 if cache_dtype == torch.int8 else torch.float8_e4m3fn
    slots = ragged_slots(num_blocks, block_size, device) if slots is None else slots
    key, value = make_tokens(slots.numel(), heads, head_size, torch.bfloat16, device)
    key.mul_(torch.exp(torch.randn(slots.numel(), heads, 1, device=device) * 3).bfloat16())  # per-token ranges
    key[0, 0] = 0  # an all-zero vector: scale 1, zeros stored
    K, V = make_caches(num_blocks, heads, head_size, block_size, cache_dtype, device, asm_layout)
    k_scales = torch.rand(num_blocks, heads, block_size, device=device) + 1
    v_scales = torch.rand(num_blocks, heads, block_size, device=device) + 1
    (key_enc, key_s), (value_enc, value_s) = per_token_encode(key, logical), per_token_encode(value, logical)
    expected_k, expected_v, (expected_ks, expected_vs) = torch_write(
        K, V, key_enc, value_enc, slots, asm_layout, k_scales, v_scales, (key_s, value_s))
    reshape_and_cache_with_pertoken_quant(key, value, K, V, k_scales, v_scales, slots, asm_layout=asm_layout)
    assert_same_bits(K, expected_k)
    assert_same_bits(V, expected_v)
    torch.testing.assert_close(k_scales, expected_ks, rtol=0, atol=0)
    torch.testing.assert_close(v_scales, expected_vs, rtol=0, atol=0)
    return key, value, K, V, k_scales, v_scales, slots


@pytest.mark.parametrize("asm_layout", [True, False], ids=["asm", "vllm"])
@pytest.mark.parametrize("block_size,head_size", [(16, 64), (32, 128)])
@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.int8, torch.uint8], ids=str)
def test_per_token(cache_dtype, block_size, head_size, asm_layout, device):
    per_token_case(cache_dtype, block_size, head_size, asm_layout, device)


def read_back(K, V, slots, logical):
    """Stored codes ``[n, H, D]`` (as fp32) of the valid slots, from a shuffled cache."""
    s = slots[slots >= 0].long()
    block_size, x = K.shape[3], K.shape[4]
    b, o = s // block_size, s % block_size
    K, V = K.view(logical), V.view(logical)
    k = K.float()[b, :, :, o, :].flatten(-2)
    v = V.float()[b, :, o // x, :, o % x]
    return k, v


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.int8], ids=str)
def test_per_token_properties(cache_dtype, device):
    """Dequantized values lie within half a quantization step of the input (fp8:
    within 2^-4 relatively, or half the subnormal spacing 2^-10 * scale absolutely);
    each vector's largest magnitude maps to +-qmax * scale; scale = amax / qmax."""
    qmax = QMAX[cache_dtype]
    key, value, K, V, k_scales, v_scales, slots = per_token_case(cache_dtype, 16, 64, True, device)
    valid = slots >= 0
    s = slots[valid].long()
    b, o = s // 16, s % 16
    stored_k, stored_v = read_back(K, V, slots, cache_dtype)
    for real, stored, scales in ((key[valid], stored_k, k_scales), (value[valid], stored_v, v_scales)):
        real = real.float()
        scale = scales[b, :, o]  # [n, H]
        amax = real.abs().amax(-1)
        nonzero = amax > 0
        torch.testing.assert_close(scale[nonzero], (amax / qmax)[nonzero], rtol=2e-7, atol=0)
        assert torch.all(scale[~nonzero] == 1)
        deq = stored * scale[..., None]
        assert torch.isfinite(deq).all()
        err = (deq - real).abs()
        if cache_dtype == torch.int8:
            bound = scale[..., None] / 2 * (1 + 1e-5)
        else:
            # (1 + 1e-5): real / scale is rounded to fp32 before fp8, so a quotient just under
            # a midpoint can land on it and round away (seen: 1.7e-7 over the bound)
            bound = torch.maximum(real.abs() * 2**-4, scale[..., None] * 2**-10) * (1 + 1e-5)
        assert torch.all(err <= bound)
        at_max = real.abs() == amax[..., None]
        assert torch.all(stored.abs()[at_max & nonzero[..., None]] == qmax)
        assert torch.all(stored[~nonzero] == 0)


# property-based ---------------------------------------------------------------- #


@HYPOTHESIS
@given(
    mode=st.sampled_from(["bf16", "fp16", "fp8", "int8", "fp8-per-token", "int8-per-token"]),
    asm_layout=st.booleans(),
    block_vectors=st.sampled_from([1, 2]),
    head_vectors=st.integers(1, 5),
    heads=st.integers(1, 3),
    num_blocks=st.integers(3, 6),
    slot_dtype=st.sampled_from([torch.int32, torch.int64]),
)
def test_cache_write_property(mode, asm_layout, block_vectors, head_vectors, heads, num_blocks, slot_dtype, device):
    cache_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}.get(mode.split("-")[0], torch.float8_e4m3fn)
    x = x_of(cache_dtype)
    block_size, head_size = block_vectors * 16, head_vectors * x
    slots = ragged_slots(num_blocks, block_size, device, slot_dtype)
    if mode.endswith("per-token"):
        per_token_case(cache_dtype, block_size, head_size, asm_layout, device, num_blocks, heads, slots)
        return
    token_dtype = torch.float16 if mode == "fp16" else torch.bfloat16
    key, value = make_tokens(slots.numel(), heads, head_size, token_dtype, device, strided=bool(heads % 2))
    K, V = make_caches(num_blocks, heads, head_size, block_size, cache_dtype, device, asm_layout)
    if cache_dtype.itemsize == 2:
        key_enc, value_enc, args = key, value, ("auto",)
    else:
        k_scale, v_scale = torch.rand(1, device=device) + 0.01, torch.rand(1, device=device) + 0.01
        key = key * 50  # partly beyond the code range: exercises the clamp
        key_enc, value_enc = encode(key, k_scale, cache_dtype), encode(value, v_scale, cache_dtype)
        args = (mode, k_scale, v_scale)
    expected_k, expected_v, _ = torch_write(K, V, key_enc, value_enc, slots, asm_layout)
    reshape_and_cache(key, value, K, V, slots, *args, asm_layout=asm_layout)
    assert_same_bits(K, expected_k)
    assert_same_bits(V, expected_v)


# validation ---------------------------------------------------------------------- #


def _args(num_tokens=5, heads=2, head_size=64, block_size=16, num_blocks=3, cache_dtype=torch.bfloat16, asm_layout=True):
    key, value = make_tokens(num_tokens, heads, head_size, torch.bfloat16, "cpu", strided=False)
    K, V = make_caches(num_blocks, heads, head_size, block_size, cache_dtype, "cpu", asm_layout)
    slots = torch.arange(num_tokens)
    return dict(key=key, value=value, key_cache=K, value_cache=V, slot_mapping=slots)


def _quant_args(cache_dtype=torch.float8_e4m3fn, **kw):
    a = _args(cache_dtype=cache_dtype, **kw)
    nb, h, _, bs, _ = a["key_cache"].shape
    a.update(k_dequant_scales=torch.zeros(nb, h, bs), v_dequant_scales=torch.zeros(nb, h, bs))
    return a


def _with(base, **changes):
    def make():
        a = base()
        for k, v in changes.items():
            a[k] = v(a) if callable(v) else v
        return a

    return make


COMMON_ERRORS = [
    (dict(key=lambda a: a["key"][0]), ValueError, r"key: expected a 3-D"),
    (dict(key=lambda a: a["key"].float(), value=lambda a: a["value"].float()), TypeError, r"key: expected dtype"),
    (dict(value=lambda a: a["value"].half()), TypeError, r"value: expected the dtype of key"),
    (dict(value=lambda a: a["value"][:4]), ValueError, r"value: expected shape"),
    (dict(key=lambda a: a["key"].transpose(1, 2).contiguous().transpose(1, 2)), ValueError, r"key: the last dim must be contiguous"),
    (dict(value=lambda a: a["value"].to("meta")), ValueError, r"value: expected a tensor on cpu"),
    (dict(slot_mapping=lambda a: a["slot_mapping"][None]), ValueError, r"slot_mapping: expected a 1-D"),
    (dict(slot_mapping=lambda a: a["slot_mapping"].float()), TypeError, r"slot_mapping: expected dtype int32 or int64"),
    (dict(slot_mapping=lambda a: a["slot_mapping"][:4]), ValueError, r"slot_mapping: expected one slot per token"),
    (dict(slot_mapping=lambda a: torch.arange(10)[::2]), ValueError, r"slot_mapping: must be contiguous"),
    (dict(slot_mapping=lambda a: a["slot_mapping"].to("meta")), ValueError, r"slot_mapping: expected a tensor on cpu"),
    (dict(key_cache=lambda a: a["key_cache"][0]), ValueError, r"key_cache: expected a 5-D"),
    (dict(value_cache=lambda a: a["value_cache"][0]), ValueError, r"value_cache: expected a 5-D"),
    (dict(key_cache=lambda a: a["key_cache"][:, :1]), ValueError, r"key_cache: expected shape .* num_kv_heads and head_size of key"),
    (dict(value_cache=lambda a: a["value_cache"][:2]), ValueError, r"value_cache: expected shape"),
    (dict(key_cache=lambda a: a["key_cache"].to("meta")), ValueError, r"key_cache: expected a tensor on cpu"),
    (dict(value_cache=lambda a: a["value_cache"].to("meta")), ValueError, r"value_cache: expected a tensor on cpu"),
    (dict(key_cache=lambda a: a["key_cache"].transpose(2, 3).contiguous().transpose(2, 3)), ValueError,
     r"key_cache: the last 3 dims must be contiguous"),
    (dict(asm_layout=1), TypeError, r"asm_layout: expected a bool"),
]


@pytest.mark.parametrize("changes,error,match", COMMON_ERRORS + [
    (dict(value_cache=lambda a: a["value_cache"].half()), TypeError, r"value_cache: expected the dtype of key_cache"),
    (dict(kv_cache_dtype="fp4"), ValueError, r"key_cache: kv_cache_dtype: expected one of"),
    (dict(kv_cache_dtype=None), TypeError, r"kv_cache_dtype: expected a str"),
    (dict(key_cache=lambda a: a["key_cache"].half(), value_cache=lambda a: a["value_cache"].half()), TypeError,
     r"key_cache: kv_cache_dtype='auto' expects a cache of the dtype of key"),
    (dict(kv_cache_dtype="fp8"), ValueError, r"key_cache: kv_cache_dtype='fp8' but the cache holds torch.bfloat16"),
    (dict(key_cache=lambda a: a["key_cache"][:1].expand(a["key_cache"].shape)), ValueError,
     r"key_cache: its elements must not share memory"),
])  # fmt: skip
def test_reshape_and_cache_errors(changes, error, match):
    args = _with(_args, **changes)()
    kv_cache_dtype = args.pop("kv_cache_dtype", "auto")
    asm_layout = args.pop("asm_layout", True)
    with pytest.raises(error, match=match):
        reshape_and_cache(**args, kv_cache_dtype=kv_cache_dtype, asm_layout=asm_layout)


@pytest.mark.parametrize(
    "make,kwargs,error,match",
    [
        (lambda: _args(head_size=60), {}, ValueError, r"key: head_size must be divisible by x=8"),
        (lambda: (a := _args(head_size=16, block_size=16)) | dict(value_cache=a["key_cache"]), {}, ValueError,
         r"value_cache: must not be the same memory as key_cache"),
        (lambda: _args(block_size=12), {}, ValueError, r"key_cache: block_size must be divisible by x=8"),
        (lambda: _args(block_size=8, cache_dtype=torch.int8), dict(kv_cache_dtype="int8"), ValueError,
         r"key_cache: block_size must be divisible by x=16"),
        (lambda: _args(cache_dtype=torch.uint8), dict(kv_cache_dtype="auto"), TypeError,
         r"key_cache: kv_cache_dtype='auto' expects"),
        (lambda: _args(cache_dtype=torch.float8_e4m3fn), dict(kv_cache_dtype="fp8", k_scale=torch.ones(2), v_scale=torch.ones(1)),
         ValueError, r"k_scale: expected a 1-element tensor"),
        (lambda: _args(cache_dtype=torch.float8_e4m3fn), dict(kv_cache_dtype="fp8", k_scale=torch.ones(1), v_scale=torch.ones(1).double()),
         TypeError, r"v_scale: expected dtype float32"),
        (lambda: _args(cache_dtype=torch.float8_e4m3fn), dict(kv_cache_dtype="fp8", k_scale=torch.ones(1)), ValueError,
         r"k_scale, v_scale: pass both or neither"),
        (lambda: _args(cache_dtype=torch.float8_e4m3fn), dict(kv_cache_dtype="fp8", k_scale=torch.ones(1, device="meta"),
                                                               v_scale=torch.ones(1)), ValueError, r"k_scale: expected a tensor on cpu"),
        (lambda: _args(cache_dtype=torch.float8_e4m3fn, asm_layout=False), dict(kv_cache_dtype="fp8"), ValueError,
         r"value_cache: expected a 5-D"),
        (lambda: _args(asm_layout=False), dict(asm_layout=False, kv_cache_dtype="auto", value_cache=torch.zeros(3, 2, 64, 16).bfloat16().transpose(2, 3).contiguous().transpose(2, 3)),
         ValueError, r"value_cache: the last 2 dims must be contiguous"),
    ],
)  # fmt: skip
def test_reshape_and_cache_more_errors(make, kwargs, error, match):
    args = make()
    args.update(kwargs)
    with pytest.raises(error, match=match):
        reshape_and_cache(**args)


@pytest.mark.parametrize("changes,error,match", COMMON_ERRORS + [
    (dict(key_cache=lambda a: a["key_cache"].view(torch.int8)), TypeError, r"value_cache: expected the dtype of key_cache"),
    (dict(key_cache=torch.zeros(3, 2, 8, 16, 8).bfloat16()), TypeError, r"key_cache: per-token quantization needs"),
    (dict(k_dequant_scales=lambda a: a["k_dequant_scales"][:, :, :8]), ValueError, r"k_dequant_scales: expected shape \(3, 2, 16\)"),
    (dict(v_dequant_scales=lambda a: a["v_dequant_scales"].double()), TypeError, r"v_dequant_scales: expected dtype float32"),
    (dict(v_dequant_scales=lambda a: a["v_dequant_scales"].transpose(1, 2).contiguous().transpose(1, 2)), ValueError,
     r"v_dequant_scales: the last dim must be contiguous"),
    (dict(k_dequant_scales=lambda a: a["k_dequant_scales"].to("meta")), ValueError, r"k_dequant_scales: expected a tensor on cpu"),
    (dict(k_dequant_scales="scales"), TypeError, r"k_dequant_scales: expected a torch.Tensor"),
    (dict(v_dequant_scales=lambda a: a["k_dequant_scales"]), ValueError,
     r"v_dequant_scales: must not be the same memory as k_dequant_scales"),
    (dict(k_dequant_scales=lambda a: a["k_dequant_scales"][:1].expand(a["k_dequant_scales"].shape)), ValueError,
     r"k_dequant_scales: its elements must not share memory"),
])  # fmt: skip
def test_per_token_errors(changes, error, match):
    args = _with(_quant_args, **changes)()
    asm_layout = args.pop("asm_layout", True)
    with pytest.raises(error, match=match):
        reshape_and_cache_with_pertoken_quant(**args, asm_layout=asm_layout)


@pytest.mark.parametrize("per_token", [False, True], ids=["copy", "per-token"])
@pytest.mark.parametrize(
    "slots,match",
    [
        ([0, 1, 48, 2, -1], r"slot_mapping: slots must be below num_blocks \* block_size = 48 \(negative for padding\), got \[48\]"),
        ([0, 1, 7, -1, 7], r"slot_mapping: slots must be distinct, repeated: \[7\]"),
    ],
    ids=["past-the-cache", "repeated"],
)
def test_full_validation_of_slots(slots, match, per_token, device):
    """validate="full" reads the slots back and names the bad ones; the default call does not."""
    args = _quant_args(cache_dtype=torch.int8) if per_token else _args()
    args = {k: v.to(device) for k, v in args.items()}
    args["slot_mapping"] = torch.tensor(slots, device=device)
    write = reshape_and_cache_with_pertoken_quant if per_token else reshape_and_cache
    with pytest.raises(ValueError, match=match):
        write(**args, validate="full")
    ok = dict(args, slot_mapping=torch.tensor([0, 1, 47, 2, -1], device=device))
    write(**ok, validate="full")
    with pytest.raises(ValueError, match=r"validate: expected 'shapes' or 'full', got 'all'"):
        write(**ok, validate="all")


def test_cpu_tensors_without_interpreter(monkeypatch):
    """Without the interpreter, CPU tensors get a clear error instead of a Triton failure."""
    import pa_hybrid.layouts

    monkeypatch.setattr(pa_hybrid.layouts, "interpreting", lambda: False)
    with pytest.raises(ValueError, match=r"key: Triton kernels need tensors on a GPU"):
        reshape_and_cache(**_args(), kv_cache_dtype="auto")
    with pytest.raises(ValueError, match=r"key: Triton kernels need tensors on a GPU"):
        reshape_and_cache_with_pertoken_quant(**_quant_args())
