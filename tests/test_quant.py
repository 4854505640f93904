"""Quantization helpers (quant.py, kernels/scales.py): scale expansion, whole-cache
quantization against plain torch and against the cache writer, dequantization."""

import pytest
import torch

from pa_hybrid.cache import reshape_and_cache, reshape_and_cache_with_pertoken_quant
from pa_hybrid.layouts import k_cache_shape, v_cache_shape
from pa_hybrid.testing import round_half_away_from_zero
from pa_hybrid.quant import dequantize_kv_cache, expand_per_tensor_scale, quantize_kv_cache, quantize_values

QMAX = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}


def token_major(K, V):
    """Shuffled ``K[b, h, d // x, t, d % x]``, ``V[b, h, t // x, d, t % x]`` -> ``[b, t, h, d]`` fp32."""
    nb, h, dx, bs, x = K.shape
    k = K.float().permute(0, 3, 1, 2, 4).reshape(nb, bs, h, dx * x)
    v = V.float().permute(0, 2, 4, 1, 3).reshape(nb, bs, h, dx * x)
    return k, v


def random_cache(num_blocks, heads, head_size, block_size, dtype, device):
    """A shuffled 16-bit cache (x=8) whose token vectors span many magnitudes, one all-zero."""
    K = torch.randn(num_blocks, heads, head_size // 8, block_size, 8, device=device)
    V = torch.randn(num_blocks, heads, block_size // 8, head_size, 8, device=device)
    K = K * torch.exp(torch.randn(num_blocks, heads, 1, block_size, 1, device=device) * 2)
    K[0, 0, :, 0, :] = 0
    return K.to(dtype), V.to(dtype)


def reference_quantize(real, scale, dtype):
    q = (real / scale).clamp(-QMAX[dtype], QMAX[dtype])
    return (round_half_away_from_zero(q) if dtype == torch.int8 else q).to(dtype)


def bits(t):
    return t.view(torch.uint8) if t.element_size() == 1 else t


# expand_per_tensor_scale --------------------------------------------------------- #


def test_expand_per_tensor_scale(device):
    scale = torch.rand(1, device=device) + 0.1
    out = expand_per_tensor_scale(scale, 5, 3, 16)
    assert out.shape == (5, 3, 16) and out.dtype == torch.float32 and out.device.type == torch.device(device).type
    assert torch.equal(out, scale.expand(5, 3, 16))
    given = torch.full((7, 2, 32), float("nan"), device=device)
    result = expand_per_tensor_scale(scale.reshape(()), 7, 2, 32, out=given)
    assert result is given
    assert torch.equal(given, scale.reshape(()).expand(7, 2, 32))
    assert expand_per_tensor_scale(scale, 0, 3, 16).shape == (0, 3, 16)


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((torch.ones(2), 2, 2, 16), {}, ValueError, r"scale: expected a 1-element tensor"),
        ((torch.ones(1).double(), 2, 2, 16), {}, TypeError, r"scale: expected dtype float32"),
        ((1.0, 2, 2, 16), {}, TypeError, r"scale: expected a torch.Tensor"),
        ((torch.ones(1), -1, 2, 16), {}, ValueError, r"num_blocks: expected a non-negative int"),
        ((torch.ones(1), 2, 2.0, 16), {}, ValueError, r"num_kv_heads: expected a non-negative int"),
        ((torch.ones(1), 2, 2, 16), dict(out=torch.empty(2, 2, 8)), ValueError, r"out: expected shape \(2, 2, 16\)"),
        ((torch.ones(1), 2, 2, 16), dict(out=torch.empty(2, 2, 16).half()), TypeError, r"out: expected dtype float32"),
        ((torch.ones(1), 2, 2, 16), dict(out=torch.empty(2, 16, 2).transpose(1, 2)), ValueError, r"out: must be contiguous"),
        ((torch.ones(1), 2, 2, 16), dict(out=torch.empty(2, 2, 16, device="meta")), ValueError, r"out: expected a tensor on cpu"),
    ],
)
def test_expand_errors(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        expand_per_tensor_scale(*args, **kwargs)


# quantize_kv_cache ---------------------------------------------------------------- #


@pytest.mark.parametrize("block_size,head_size", [(16, 64), (32, 128)])
@pytest.mark.parametrize("source_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8], ids=str)
def test_quantize_per_token(dtype, source_dtype, block_size, head_size, device):
    qmax = QMAX[dtype]
    K, V = random_cache(3, 2, head_size, block_size, source_dtype, device)
    K8, V8, k_scale, v_scale = quantize_kv_cache(K, V, dtype)
    nb, h = 3, 2
    assert K8.shape == (nb, h, head_size // 16, block_size, 16) and K8.dtype == dtype
    assert V8.shape == (nb, h, block_size // 16, head_size, 16) and V8.dtype == dtype
    assert k_scale.shape == v_scale.shape == (nb, h, block_size) and k_scale.dtype == torch.float32
    for real, stored, scale in zip(token_major(K, V), token_major(K8, V8), (k_scale, v_scale)):
        scale = scale.permute(0, 2, 1)  # [nb, bs, h]
        amax = real.abs().amax(-1)
        expected_scale = torch.where(amax > 0, amax / torch.full_like(amax, qmax), torch.ones_like(amax))
        assert torch.equal(scale, expected_scale)
        assert torch.equal(bits(stored.to(dtype)), bits(reference_quantize(real, expected_scale[..., None], dtype)))
        deq = stored * scale[..., None]
        err = (deq - real).abs()
        if dtype == torch.int8:
            assert torch.all(err <= scale[..., None] / 2 * (1 + 1e-5))
        else:
            # (1 + 1e-5): the fp32 rounding of real / scale before fp8 (see test_cache.py)
            assert torch.all(err <= torch.maximum(real.abs() * 2**-4, scale[..., None] * 2**-10) * (1 + 1e-5))
        at_max = (real.abs() == amax[..., None]) & (amax[..., None] > 0)
        assert torch.all(stored.abs()[at_max] == qmax)
    assert torch.all(k_scale[0, 0, 0] == 1) and torch.all(K8[0, 0, :, 0, :].float() == 0)  # the zero vector


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8], ids=str)
def test_quantize_per_tensor(dtype, device):
    K, V = random_cache(3, 2, 64, 16, torch.bfloat16, device)
    K8, V8, k_scale, v_scale = quantize_kv_cache(K, V, dtype, per_token=False)
    assert k_scale.shape == v_scale.shape == (1,)
    for real, stored, scale in zip(token_major(K, V), token_major(K8, V8), (k_scale, v_scale)):
        amax = real.abs().amax().reshape(1)
        assert torch.equal(scale, amax / torch.full_like(amax, QMAX[dtype]))
        assert torch.equal(bits(stored.to(dtype)), bits(reference_quantize(real, scale, dtype)))
        assert stored.abs().max() == QMAX[dtype]


@pytest.mark.parametrize("per_token", [True, False], ids=["per-token", "per-tensor"])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8], ids=str)
def test_quantize_equals_cache_write(dtype, per_token, device):
    """Writing every token of a 16-bit cache (in random order) into an 8-bit cache
    gives the bits (and scales) of quantizing the whole cache."""
    nb, h, d, bs = 4, 2, 64, 32
    K, V = random_cache(nb, h, d, bs, torch.bfloat16, device)
    K8, V8, k_scale, v_scale = quantize_kv_cache(K, V, dtype, per_token=per_token)
    key, value = token_major(K, V)
    order = torch.randperm(nb * bs, device=device)
    key = key.reshape(nb * bs, h, d)[order].bfloat16()
    value = value.reshape(nb * bs, h, d)[order].bfloat16()
    slots = torch.arange(nb * bs, device=device)[order]
    Kw = torch.zeros_like(K8)
    Vw = torch.zeros_like(V8)
    if per_token:
        ks, vs = torch.zeros_like(k_scale), torch.zeros_like(v_scale)
        reshape_and_cache_with_pertoken_quant(key, value, Kw, Vw, ks, vs, slots)
        assert torch.equal(ks, k_scale) and torch.equal(vs, v_scale)
    else:
        kv_cache_dtype = "int8" if dtype == torch.int8 else "fp8"
        reshape_and_cache(key, value, Kw, Vw, slots, kv_cache_dtype, k_scale, v_scale)
    assert torch.equal(bits(Kw), bits(K8))
    assert torch.equal(bits(Vw), bits(V8))


def test_int8_rounds_quotients_next_to_a_half(device):
    """Quotients v / s one fp32 step below, at and above n + 0.5 round to n, n + 1, n + 1 (and
    their negatives away from zero), in whole-cache quantization and in the cache writer."""
    halves = torch.tensor([0.5, 1.5, 2.5, 63.5, 126.5])
    base = torch.tensor(1.5) / halves  # fp32 scales whose quotients of 1.5 are near the halves
    scales = torch.cat([base.nextafter(torch.tensor(0.0)), base, base.nextafter(torch.tensor(float("inf")))])
    real = torch.tensor([1.5, -1.5])
    quotients = real[None, :] / scales[:, None]
    expected = round_half_away_from_zero(quotients)
    # the cases where floor(|q| + 0.5) in fp32 gives one level too many are among them
    assert not torch.equal(expected, torch.sign(quotients) * torch.floor(quotients.abs() + 0.5))
    assert torch.equal(quantize_values(real[None, :], scales[:, None], torch.int8).float(), expected)
    K = torch.zeros(1, 1, 1, 16, 16, dtype=torch.int8, device=device)
    V = torch.zeros_like(K)
    key = torch.zeros(2, 1, 16, dtype=torch.bfloat16, device=device)
    key[:, 0, 0] = real.to(device)
    for scale, want in zip(scales, expected):
        s = scale.reshape(1).to(device)
        reshape_and_cache(key, key.clone(), K, V, torch.tensor([0, 1], device=device), "int8", s, s.clone())
        assert torch.equal(K[0, 0, 0, :2, 0].float().cpu(), want), (scale.item(), K[0, 0, 0, :2, 0], want)


@pytest.mark.parametrize("per_token", [True, False], ids=["per-token", "per-tensor"])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8, torch.uint8], ids=str)
def test_dequantize(dtype, per_token, device):
    K, V = random_cache(2, 2, 64, 16, torch.bfloat16, device)
    K8, V8, k_scale, v_scale = quantize_kv_cache(K, V, torch.int8 if dtype == torch.int8 else torch.float8_e4m3fn, per_token)
    if dtype == torch.uint8:
        K8, V8 = K8.view(torch.uint8), V8.view(torch.uint8)
    Kd, Vd = dequantize_kv_cache(K8, V8, k_scale, v_scale, torch.float32)
    assert Kd.shape == (2, 2, 16, 16, 4) and Vd.shape == (2, 2, 4, 64, 4) and Kd.dtype == torch.float32
    for deq, stored, scale in zip(token_major(Kd, Vd), token_major(K8.view(torch.int8) if dtype == torch.int8 else K8.view(torch.float8_e4m3fn),
                                                                   V8.view(torch.int8) if dtype == torch.int8 else V8.view(torch.float8_e4m3fn)),
                                  (k_scale, v_scale)):  # fmt: skip
        s = scale.permute(0, 2, 1)[..., None] if per_token else scale
        assert torch.equal(deq, stored * s)
    Kb, Vb = dequantize_kv_cache(K8, V8, k_scale, v_scale)  # bf16, x=8: the source layout
    assert Kb.shape == K.shape and Vb.shape == V.shape and Kb.dtype == torch.bfloat16


@pytest.mark.parametrize("per_token", [True, False], ids=["per-token", "per-tensor"])
def test_cache_of_no_blocks_round_trips(per_token, device):
    """A cache with no blocks yet quantizes and dequantizes to empty caches the API accepts."""
    K = torch.empty(k_cache_shape(0, 2, 64, 16, torch.bfloat16), dtype=torch.bfloat16, device=device)
    V = torch.empty(v_cache_shape(0, 2, 64, 16, torch.bfloat16), dtype=torch.bfloat16, device=device)
    K8, V8, k_scale, v_scale = quantize_kv_cache(K, V, torch.int8, per_token=per_token)
    assert K8.shape == k_cache_shape(0, 2, 64, 16, torch.int8) and V8.shape == v_cache_shape(0, 2, 64, 16, torch.int8)
    assert k_scale.shape == ((0, 2, 16) if per_token else (1,))
    K16, V16 = dequantize_kv_cache(K8, V8, k_scale, v_scale)
    assert K16.shape == K.shape and V16.shape == V.shape


def test_quantize_errors():
    K, V = random_cache(3, 2, 64, 16, torch.bfloat16, "cpu")
    with pytest.raises(TypeError, match=r"dtype: expected torch.float8_e4m3fn or torch.int8"):
        quantize_kv_cache(K, V, torch.bfloat16)
    with pytest.raises(TypeError, match=r"K: expected dtype bfloat16 or float16"):
        quantize_kv_cache(K.float(), V.float(), torch.int8)
    with pytest.raises(ValueError, match=r"V: expected shape"):
        quantize_kv_cache(K, V[:1], torch.int8)
    K8, V8 = random_cache(3, 2, 64, 8, torch.bfloat16, "cpu")  # block size 8: fine for bf16, not for 8-bit
    with pytest.raises(ValueError, match=r"K: block_size must be divisible by x=16"):
        quantize_kv_cache(K8, V8, torch.int8)
    K24, V24 = random_cache(3, 2, 24, 16, torch.bfloat16, "cpu")  # head size 24
    with pytest.raises(ValueError, match=r"K: head_size must be divisible by x=16"):
        quantize_kv_cache(K24, V24, torch.float8_e4m3fn)


def test_dequantize_errors():
    K, V = random_cache(2, 2, 64, 16, torch.bfloat16, "cpu")
    K8, V8, ks, vs = quantize_kv_cache(K, V, torch.int8)
    with pytest.raises(TypeError, match=r"K: expected dtype float8_e4m3fn or int8 or uint8"):
        dequantize_kv_cache(K, V, ks, vs)
    with pytest.raises(ValueError, match=r"k_scale: expected shape \(2, 2, 16\)"):
        dequantize_kv_cache(K8, V8, ks[:, :, :8], vs)
    with pytest.raises(TypeError, match=r"v_scale: expected dtype float32"):
        dequantize_kv_cache(K8, V8, ks, vs.double())
    with pytest.raises(TypeError, match=r"dtype: expected bfloat16, float16 or float32"):
        dequantize_kv_cache(K8, V8, ks, vs, torch.int8)


def test_cpu_tensors_without_interpreter(monkeypatch):
    import pa_hybrid.layouts

    monkeypatch.setattr(pa_hybrid.layouts, "interpreting", lambda: False)
    with pytest.raises(ValueError, match=r"scale: Triton kernels need tensors on a GPU"):
        expand_per_tensor_scale(torch.ones(1), 2, 2, 16)
