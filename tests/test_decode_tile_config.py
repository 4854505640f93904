"""The Triton stage 1's tile: its pipeline depth follows the cache's element size and, for
16-bit caches, how sparse the launched grid is (decode_tile_config's docstring has the
measurements); the launcher derives the sparsity from the grid it launches and keeps one
stage where the device's shared memory cannot hold three."""

import pytest
import torch

from pa_hybrid import paged_attention_common, reference_paged_attention
from pa_hybrid.backends import base
from pa_hybrid.kernels import decode
from pa_hybrid.testing import make_decode_case

from conftest import skip_if_unsupported


@pytest.mark.parametrize("head_size", [64, 128, 256])
def test_stages_by_element_size_and_grid(head_size):
    tokens = 16384 // head_size
    assert decode.decode_tile_config(head_size, 16, 2) == (tokens, 4, 1)
    assert decode.decode_tile_config(head_size, 16, 2, sparse_grid=True) == (tokens, 4, 3)
    for sparse in (False, True):
        assert decode.decode_tile_config(head_size, 16, 1, sparse_grid=sparse) == (tokens, 4, 3)
        # wave64 GPUs: one stage whatever the grid (their tiles are sized not to spill)
        assert decode.decode_tile_config(head_size, 16, 2, warp_size=64, sparse_grid=sparse)[2] == 1


def test_only_8bit_tiles_of_64_rows_take_fewer_tokens():
    """Measured (RESULTS 48): smaller tiles for more rows paid off only on 8-bit caches at 64 rows."""
    for rows in (16, 32, 64):
        assert decode.decode_tile_config(128, 16, 2, rows=rows)[0] == 128
    assert decode.decode_tile_config(128, 16, 1, rows=32)[0] == 128
    assert decode.decode_tile_config(128, 16, 1, rows=64)[0] == 32
    assert decode.decode_tile_config(256, 16, 1, rows=64)[0] == 16
    assert decode.decode_tile_config(256, 32, 1, rows=64)[0] == 32  # never less than a cache block


@pytest.mark.parametrize("shared_memory", [232448, 101376], ids=["sm90", "sm89"])
@pytest.mark.parametrize("num_sms", [2, 16, 64, 1024])
def test_launcher_calls_a_grid_sparse_at_most_one_program_per_two_sms(device, monkeypatch, num_sms, shared_memory):
    case = make_decode_case([5, 300, 700], num_heads=8, num_kv_heads=2, kv_dtype=torch.bfloat16, device=device)
    skip_if_unsupported("triton", case)
    monkeypatch.setattr(base, "sm_count", lambda *_: num_sms)
    # where three stages' tiles do not fit, sparse grids keep one stage
    monkeypatch.setattr(decode, "shared_memory_per_program", lambda _: shared_memory)
    seen = []
    config = decode.decode_tile_config
    monkeypatch.setattr(decode, "decode_tile_config", lambda *a, **k: seen.append(a) or config(*a, **k))
    launch = decode.launch_paged_decode
    grids = []

    def recording_launch(*args, **kwargs):
        partitions = -(-kwargs["max_seq_len"] // kwargs["partition_size"])
        grids.append(partitions * case["K"].shape[1] * case["context_lens"].shape[0])
        return launch(*args, **kwargs)

    monkeypatch.setattr("pa_hybrid.backends.triton.launch_paged_decode", recording_launch)
    out = paged_attention_common(exp_sums=None, max_logits=None, tmp_out=None, backend="triton", **case)
    assert len(seen) == len(grids) == 1
    assert seen[0][4] == (2 * grids[0] <= num_sms and shared_memory >= decode.SPARSE_GRID_SHARED_MEMORY)
    torch.testing.assert_close(out.float(), reference_paged_attention(**case), rtol=3e-2, atol=3e-2)
