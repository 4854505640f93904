"""benchmarks/bench_triton_tiles.py: the tile it names is the one stage 1 launches, and
every tile stays right, whole tiles and ragged ends alike (under the CPU interpreter
only the tokens per tile matter; warps and stages are the compiler's)."""

import argparse

import pytest
import torch

from pa_hybrid import paged_attention_common, reference_paged_attention
from pa_hybrid.kernels import decode
from pa_hybrid.testing import make_decode_case

from conftest import load_script, skip_if_unsupported
from test_paged_attention_common import poison_unused_slots


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/bench_triton_tiles.py")


@pytest.mark.parametrize("tile, launched", [("16x4x1", (16, 4, 1)), ("32x4x3", (32, 4, 3)), ("128x8x2", (128, 8, 2))])
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
def test_named_tile_is_launched_and_right(bench, device, monkeypatch, tile, launched, kv_dtype):
    # lengths around the tile and block sizes, so that whole tiles, ragged ends and empty
    # contexts all occur; slots past each context hold NaN
    case = make_decode_case([0, 1, 15, 16, 17, 64, 127, 300], num_heads=8, num_kv_heads=2, kv_dtype=kv_dtype, device=device)
    skip_if_unsupported("triton", case)
    poison_unused_slots(case)
    own = decode.decode_tile_config(128, 16, 2)
    seen = []
    launch = decode.launch_paged_decode
    monkeypatch.setattr(
        decode, "launch_paged_decode", lambda *a, **k: seen.append(decode.decode_tile_config(128, 16, 2)) or launch(*a, **k)
    )
    # the backend module imported the launcher by name
    monkeypatch.setattr("pa_hybrid.backends.triton.launch_paged_decode", decode.launch_paged_decode)
    with bench.decode_tile(tile):
        out = paged_attention_common(exp_sums=None, max_logits=None, tmp_out=None, backend="triton", **case)
    assert seen == [launched]
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.float(), reference_paged_attention(**case), rtol=3e-2, atol=3e-2)
    assert decode.decode_tile_config(128, 16, 2) == own  # the override ends with the block


def test_own_tile_and_bad_names(bench):
    assert bench.parse_tile("own") is None
    assert bench.parse_tile("64x4x3") == (64, 4, 3)
    for bad in ("48x4x3", "64x3x3", "64x4x0", "8x4x3"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_tile(bad)
