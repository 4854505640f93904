"""Layout conversions (layouts.py, kernels/layout_convert.py): every conversion
equals a permute/reshape in plain torch and round trips are exact, bit for bit.

Caches hold random bit patterns (every code of the dtype, NaN codes included), so
a conversion that moved values through arithmetic would be caught."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pa_hybrid.layouts import (
    allocate_scratch,
    k_cache_shape,
    shuffle_from_nhd,
    shuffle_from_vllm,
    unshuffle_to_nhd,
    unshuffle_to_vllm,
    v_cache_shape,
)

DTYPES = [torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.int8, torch.uint8]


def random_bits(shape, dtype, device):
    """A tensor of ``dtype`` whose elements are uniformly random bit patterns."""
    size = torch.empty((), dtype=dtype).element_size()
    as_int = {1: torch.uint8, 2: torch.int16}[size]
    lo, hi = (0, 256) if size == 1 else (-(2**15), 2**15)
    return torch.randint(lo, hi, shape, dtype=as_int, device=device).view(dtype)


def bits(t):
    """Integer view for exact comparison (NaN codes compare equal to themselves)."""
    return t.view({1: torch.uint8, 2: torch.int16}[t.element_size()])


def x_of(dtype):
    return 16 // torch.empty((), dtype=dtype).element_size()


# plain-torch references ---------------------------------------------------- #


def nhd_to_shuffled_k(k, x):  # [B, T, H, D] -> [B, H, D // x, T, x]
    b, t, h, d = k.shape
    return k.reshape(b, t, h, d // x, x).permute(0, 2, 3, 1, 4)


def nhd_to_shuffled_v(v, x):  # [B, T, H, D] -> [B, H, T // x, D, x]
    b, t, h, d = v.shape
    return v.reshape(b, t // x, x, h, d).permute(0, 3, 1, 4, 2)


def nhd_to_vllm_v(v):  # [B, T, H, D] -> [B, H, D, T]
    return v.permute(0, 2, 3, 1)


def assert_bits_equal(actual, expected):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.equal(bits(actual), bits(expected.contiguous()))


# conversions against torch --------------------------------------------------- #


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size,head_size", [(16, 64), (32, 128), (16, 256)])
def test_nhd_round_trip(dtype, block_size, head_size, device):
    x = x_of(dtype)
    shape = (3, block_size, 2, head_size)
    k, v = random_bits(shape, dtype, device), random_bits(shape, dtype, device)
    K, V = shuffle_from_nhd(k, v)
    assert_bits_equal(K, nhd_to_shuffled_k(k, x))
    assert_bits_equal(V, nhd_to_shuffled_v(v, x))
    assert K.is_contiguous() and V.is_contiguous()
    k2, v2 = unshuffle_to_nhd(K, V)
    assert_bits_equal(k2, k)
    assert_bits_equal(v2, v)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size,head_size", [(16, 128), (32, 64)])
def test_vllm_round_trip(dtype, block_size, head_size, device):
    x = x_of(dtype)
    nhd_k = random_bits((4, block_size, 3, head_size), dtype, device)
    nhd_v = random_bits((4, block_size, 3, head_size), dtype, device)
    key_cache = nhd_to_shuffled_k(nhd_k, x).contiguous()  # vLLM's K is the shuffled K
    value_cache = nhd_to_vllm_v(nhd_v).contiguous()
    K, V = shuffle_from_vllm(key_cache, value_cache)
    assert_bits_equal(K, key_cache)
    assert K.data_ptr() != key_cache.data_ptr()  # a new tensor
    assert_bits_equal(V, nhd_to_shuffled_v(nhd_v, x))
    key_back, value_back = unshuffle_to_vllm(K, V)
    assert_bits_equal(key_back, key_cache)
    assert_bits_equal(value_back, value_cache)


def test_strided_inputs(device):
    """NHD halves of one flash-style ``[B, 2, T, H, D]`` allocation, a vLLM V that is a
    head slice of a wider cache, and shuffled caches with a free block stride."""
    dtype, x = torch.bfloat16, 8
    kv = random_bits((3, 2, 16, 4, 64), dtype, device)
    k, v = kv[:, 0], kv[:, 1]
    K, V = shuffle_from_nhd(k, v)
    assert_bits_equal(K, nhd_to_shuffled_k(k, x))
    assert_bits_equal(V, nhd_to_shuffled_v(v, x))

    wide_v = random_bits((3, 6, 64, 16), dtype, device)
    value_cache = wide_v[:, 1:5]  # [3, 4, 64, 16], head stride 64*16, block stride 6*64*16
    K2, V2 = shuffle_from_vllm(K, value_cache)
    assert_bits_equal(V2, nhd_to_shuffled_v(value_cache.permute(0, 3, 1, 2), x))

    both = torch.stack([K, V.reshape(K.shape)], dim=1)  # [3, 2, ...]: K and V share one allocation
    k3, v3 = unshuffle_to_nhd(both[:, 0], both[:, 1].reshape(V.shape))
    assert_bits_equal(k3, k)
    assert_bits_equal(v3, v)


def test_empty_cache(device):
    k = random_bits((0, 16, 2, 64), torch.bfloat16, device)
    K, V = shuffle_from_nhd(k, k)
    assert K.shape == (0, 2, 8, 16, 8) and V.shape == (0, 2, 2, 64, 8)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    dtype=st.sampled_from(DTYPES),
    num_blocks=st.integers(1, 3),
    num_kv_heads=st.integers(1, 3),
    head_vectors=st.integers(1, 6),  # head_size = head_vectors * x: non powers of two too
    block_vectors=st.sampled_from([1, 2, 3, 4]),
)
def test_round_trips_property(dtype, num_blocks, num_kv_heads, head_vectors, block_vectors, device):
    x = x_of(dtype)
    head_size, block_size = head_vectors * x, block_vectors * x
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    k, v = random_bits(shape, dtype, device), random_bits(shape, dtype, device)
    K, V = shuffle_from_nhd(k, v)
    assert_bits_equal(K, nhd_to_shuffled_k(k, x))
    assert_bits_equal(V, nhd_to_shuffled_v(v, x))
    k2, v2 = unshuffle_to_nhd(K, V)
    assert_bits_equal(k2, k)
    assert_bits_equal(v2, v)
    key_cache, value_cache = unshuffle_to_vllm(K, V)
    assert_bits_equal(value_cache, nhd_to_vllm_v(v))
    K2, V2 = shuffle_from_vllm(key_cache, value_cache)
    assert_bits_equal(K2, K)
    assert_bits_equal(V2, V)


# validation ------------------------------------------------------------------ #


def _nhd(dtype=torch.bfloat16, shape=(2, 16, 2, 64), device="cpu"):
    return random_bits(shape, dtype, device)


@pytest.mark.parametrize(
    "make_args,error,match",
    [
        (lambda: (_nhd()[0], _nhd()), ValueError, r"key_cache: expected a 4-D"),
        (lambda: (_nhd(), _nhd()[0]), ValueError, r"value_cache: expected a 4-D"),
        (lambda: ("K", _nhd()), TypeError, r"key_cache: expected a torch.Tensor"),
        (lambda: (_nhd().float(), _nhd().float()), TypeError, r"key_cache: expected dtype"),
        (lambda: (_nhd(), _nhd(torch.float16)), TypeError, r"value_cache: expected the dtype of key_cache"),
        (lambda: (_nhd(), _nhd(shape=(2, 16, 3, 64))), ValueError, r"value_cache: expected shape"),
        (lambda: (_nhd(shape=(2, 16, 2, 60)),) * 2, ValueError, r"key_cache: head_size must be divisible by x=8"),
        (lambda: (_nhd(shape=(2, 12, 2, 64)),) * 2, ValueError, r"key_cache: block_size must be divisible by x=8"),
        (lambda: (_nhd(torch.int8, (2, 8, 2, 64)),) * 2, ValueError, r"key_cache: block_size must be divisible by x=16"),
        (lambda: (_nhd(), _nhd(device="meta")), ValueError, r"value_cache: expected a tensor on cpu"),
        (lambda: (_nhd(shape=(2, 16, 2, 0)),) * 2, ValueError, r"key_cache: head_size must be positive"),
        (lambda: (_nhd(shape=(2, 0, 2, 64)),) * 2, ValueError, r"key_cache: block_size must be positive"),
    ],
)
def test_shuffle_from_nhd_errors(make_args, error, match):
    with pytest.raises(error, match=match):
        shuffle_from_nhd(*make_args())


def _vllm(num_blocks=2, heads=2, head_size=64, block_size=16, dtype=torch.bfloat16):
    x = x_of(dtype)
    key_cache = random_bits((num_blocks, heads, head_size // x, block_size, x), dtype, "cpu")
    value_cache = random_bits((num_blocks, heads, head_size, block_size), dtype, "cpu")
    return key_cache, value_cache


@pytest.mark.parametrize(
    "make_args,error,match",
    [
        (lambda: (_vllm()[1], _vllm()[1]), ValueError, r"key_cache: expected a 5-D"),
        (lambda: (_vllm()[0], _vllm()[0]), ValueError, r"value_cache: expected a 4-D"),
        (lambda: (_vllm()[0].reshape(2, 2, 4, 16, 16), _vllm()[1]), ValueError, r"key_cache: last dim must be x=8"),
        (lambda: (_vllm()[0], _vllm(head_size=128)[1]), ValueError, r"value_cache: expected shape"),
        (lambda: (_vllm()[0], _vllm()[1].half()), TypeError, r"value_cache: expected the dtype of key_cache"),
        (lambda: (_vllm(block_size=12)[0], _vllm(block_size=12)[1]), ValueError, r"key_cache: block_size must be divisible"),
    ],
)
def test_shuffle_from_vllm_errors(make_args, error, match):
    with pytest.raises(error, match=match):
        shuffle_from_vllm(*make_args())


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((2, 1, 64.0, 16), TypeError, r"head_size: expected an int, got float"),
        ((-1, 1, 64, 16), ValueError, r"num_blocks: expected a non-negative int, got -1"),
        ((2, 0, 64, 16), ValueError, r"num_kv_heads: expected a positive int"),
        ((2, 1, 64, 12), ValueError, r"block_size: must be divisible by x=8"),
    ],
)
@pytest.mark.parametrize("shape_of", [k_cache_shape, v_cache_shape])
def test_cache_shape_errors(shape_of, args, error, match):
    assert shape_of(0, 1, 64, 16, torch.bfloat16)[0] == 0  # no blocks yet is a shape
    with pytest.raises(error, match=match):
        shape_of(*args, torch.bfloat16)
    with pytest.raises(TypeError, match=r"dtype: expected a torch.dtype .* got 'bf16'"):
        shape_of(2, 1, 64, 16, "bf16")


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((-1, 4, 64, 300), {}, ValueError, r"num_q_rows: expected a non-negative int, got -1"),
        ((2.5, 4, 64, 300), {}, TypeError, r"num_q_rows: expected an int, got float"),
        ((2, 0, 64, 300), {}, ValueError, r"num_heads: expected a positive int"),
        ((2, 4, 64, 300.5), {}, TypeError, r"max_seq_len: expected an int, got float"),
        ((2, 4, 64, 300), {"tmp_out_dtype": torch.int32}, TypeError, r"tmp_out_dtype: expected one of"),
    ],
)
def test_scratch_helper_errors(args, kwargs, error, match):
    assert allocate_scratch(0, 4, 64, 0, "cpu")[2].shape == (0, 4, 1, 64)  # no rows, no context: still a shape
    with pytest.raises(error, match=match):
        allocate_scratch(*args, "cpu", **kwargs)


@pytest.mark.parametrize("convert", [unshuffle_to_nhd, unshuffle_to_vllm])
def test_unshuffle_errors(convert):
    K = random_bits((2, 2, 8, 16, 8), torch.bfloat16, "cpu")  # built directly: no kernel runs for CPU tensors on a GPU host
    V = random_bits((2, 2, 2, 64, 8), torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match=r"K: expected a 5-D"):
        convert(K[0], V)
    with pytest.raises(ValueError, match=r"V: expected shape"):
        convert(K, V[:, :1])
    with pytest.raises(TypeError, match=r"K: expected dtype"):
        convert(K.float(), V.float())
    with pytest.raises(TypeError, match=r"V: expected the dtype of K"):
        convert(K, V.half())
    with pytest.raises(ValueError, match=r"K: last dim must be x=8"):
        convert(K.reshape(2, 2, 4, 16, 16), V)
    with pytest.raises(ValueError, match=r"K: the last three dims must be contiguous"):
        convert(K.transpose(2, 3).contiguous().transpose(2, 3), V)
    with pytest.raises(ValueError, match=r"V: expected a tensor on cpu"):
        convert(K, V.to("meta"))


def test_cpu_tensors_without_interpreter(monkeypatch):
    """Without the interpreter, CPU tensors get a clear error instead of a Triton failure."""
    import pa_hybrid.layouts

    monkeypatch.setattr(pa_hybrid.layouts, "interpreting", lambda: False)
    k = _nhd()
    with pytest.raises(ValueError, match=r"key_cache: Triton kernels need tensors on a GPU"):
        shuffle_from_nhd(k, k)
    with pytest.raises(ValueError, match=r"K: Triton kernels need tensors on a GPU"):
        unshuffle_to_nhd(random_bits((2, 2, 8, 16, 8), torch.bfloat16, "cpu"), random_bits((2, 2, 2, 64, 8), torch.bfloat16, "cpu"))
