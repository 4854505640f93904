"""Stage 2 (kernels/reduce.py): merging per-partition partials equals one softmax
over the whole context. Partials are built here, in float64, from random logits
and values, following the partial format of the module docstring."""

from unittest import mock

import pytest
import torch

from pa_hybrid.kernels import reduce
from pa_hybrid.kernels.reduce import reduce_tile, split_kv_reduce
from pa_hybrid.layouts import PARTITION_SIZE


def make_partials(visible, num_heads, head_size, max_parts, partition, tmp_dtype, device, poison=float("nan")):
    """Random logits/values per row; partials of each partition and the exact result.

    Partitions a row does not see are filled with ``poison``: the reduce must not read them.
    """
    rows = len(visible)
    exp_sums = torch.full((rows, num_heads, max_parts), poison, dtype=torch.float32)
    max_logits = torch.full((rows, num_heads, max_parts), poison, dtype=torch.float32)
    tmp_out = torch.full((rows, num_heads, max_parts, head_size), poison, dtype=torch.float64)
    expected = torch.zeros(rows, num_heads, head_size, dtype=torch.float64)
    for r, n in enumerate(visible):
        if n == 0:
            continue
        logits = torch.randn(num_heads, n, dtype=torch.float64) * 4 + torch.randn(num_heads, 1, dtype=torch.float64) * 20
        values = torch.randn(n, head_size, dtype=torch.float64)
        expected[r] = torch.softmax(logits, dim=-1) @ values
        for p in range(-(-n // partition)):
            lg = logits[:, p * partition : (p + 1) * partition]
            m = lg.max(dim=1).values
            w = torch.exp(lg - m[:, None])
            max_logits[r, :, p] = m.float()
            exp_sums[r, :, p] = w.sum(dim=1).float()
            tmp_out[r, :, p] = (w @ values[p * partition : (p + 1) * partition]) / w.sum(dim=1, keepdim=True)
    return exp_sums.to(device), max_logits.to(device), tmp_out.to(tmp_dtype).to(device), expected


TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}


@pytest.fixture(params=["grid-wide", "heads-merged"])
def heads_per_program(request):
    """The reduce as the calls of these tests get it (few rows: a head per program), and with
    heads merged by ``REDUCE_HEADS`` as larger batches get it."""
    if request.param == "grid-wide":
        yield
    else:
        with mock.patch.object(reduce, "REDUCE_MIN_PROGRAMS", 0):
            yield


@pytest.mark.parametrize("tmp_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.usefixtures("heads_per_program")
def test_reduce_ragged_lengths(device, tmp_dtype, out_dtype):
    lens = [0, 1, 255, 256, 257, 1000, 3 * 256]
    max_parts = -(-max(lens) // PARTITION_SIZE)
    es, ml, tmp, expected = make_partials(lens, 3, 64, max_parts, PARTITION_SIZE, tmp_dtype, device)
    out = torch.full((len(lens), 3, 64), float("nan"), dtype=out_dtype, device=device)
    ctx = torch.tensor(lens, dtype=torch.int32, device=device)
    split_kv_reduce(out, es, ml, tmp, ctx)
    tol = max(TOL[tmp_dtype], 1e-2)
    torch.testing.assert_close(out.double().cpu(), expected, rtol=tol, atol=tol)
    assert out[0].abs().max() == 0  # empty context -> zeros


def test_reduce_heads_in_groups_with_a_partial_last_one(device):
    # 6 heads merged 4 at a time: a program of 4 and one of 2 (2 lanes masked); more partials than a chunk
    with mock.patch.object(reduce, "REDUCE_MIN_PROGRAMS", 0):
        lens = [0, 300, 5 * 256 + 7, 17 * 256]
        max_parts = -(-max(lens) // PARTITION_SIZE)
        es, ml, tmp, expected = make_partials(lens, 6, 64, max_parts, PARTITION_SIZE, torch.float32, device)
        out = torch.full((len(lens), 6, 64), float("nan"), dtype=torch.bfloat16, device=device)
        split_kv_reduce(out, es, ml, tmp, torch.tensor(lens, dtype=torch.int32, device=device))
        torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-2, atol=1e-2)


def test_reduce_many_partitions_and_large_partition_size(device):
    # more partitions than one BLOCK_P chunk (64), and 512-token partitions
    lens = [150 * 256 + 3, 7000, 0]
    max_parts = -(-max(lens) // PARTITION_SIZE)
    es, ml, tmp, expected = make_partials(lens, 2, 128, max_parts, PARTITION_SIZE, torch.float32, device)
    out = torch.empty(3, 2, 128, dtype=torch.bfloat16, device=device)
    split_kv_reduce(out, es, ml, tmp, torch.tensor(lens, dtype=torch.int32, device=device))
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-2, atol=1e-2)

    es, ml, tmp, expected = make_partials(lens, 2, 128, max_parts, 512, torch.float32, device)
    split_kv_reduce(out, es, ml, tmp, torch.tensor(lens, dtype=torch.int32, device=device), partition_size=512)
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(
    "num_heads, rows, scratch, partition, programs_per_head, tile",
    [
        (1, 256, 64, 256, 0, (1, 64)),  # 16384 tokens in 256-token partitions: 64 partials
        (1, 256, 64, 1024, 0, (1, 16)),  # the same scratch, 1024-token partitions: 16
        (1, 256, 32, 1024, 0, (1, 8)),
        (1, 256, 3, 512, 0, (1, 2)),
        (1, 256, 151, 512, 0, (1, 64)),  # 76 partials: two chunks
        (1, 256, 64, 256, 264, (1, 64)),  # balanced: a piece per program, bounded by the scratch
        (1, 256, 64, 256, 8, (1, 8)),
        (2, 256, 64, 1024, 0, (2, 16)),  # two heads per program, each all its 16 partials
        (3, 256, 3, 512, 0, (4, 2)),  # heads padded to a power of 2
        (4, 256, 64, 1024, 0, (4, 8)),  # 4 heads: 8 partials at once each, 32 in all
        (64, 256, 64, 256, 264, (4, 8)),  # at most 4 heads per program
        (16, 64, 64, 256, 0, (4, 8)),  # 256 programs of 4 heads
        (16, 63, 64, 256, 0, (1, 64)),  # fewer: a head per program
        (64, 1, 128, 256, 0, (1, 64)),  # one sequence, 64 heads: 64 programs, not 16
    ],
)
def test_reduce_tile_covers_the_partials_a_row_can_have(num_heads, rows, scratch, partition, programs_per_head, tile):
    assert reduce_tile(num_heads, rows, scratch, partition, programs_per_head) == tile


@pytest.mark.parametrize("partition_size", [1024, 2048])
def test_reduce_long_partitions_in_scratch_for_short_ones(device, partition_size):
    # the scratch is sized for 256-token partitions (as callers allocate it), stage 1 wrote
    # 1024- or 2048-token ones into its first slots; the slots after them hold poison
    lens = [16384, 64, 1025, 2048, 5000, 0]
    scratch_parts = -(-max(lens) // PARTITION_SIZE)
    es, ml, tmp, expected = make_partials(lens, 2, 128, scratch_parts, partition_size, torch.float32, device)
    out = torch.full((len(lens), 2, 128), float("nan"), dtype=torch.bfloat16, device=device)
    ctx = torch.tensor(lens, dtype=torch.int32, device=device)
    split_kv_reduce(out, es, ml, tmp, ctx, partition_size=partition_size)
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-2, atol=1e-2)


def test_reduce_multi_token_rows(device):
    # 3 sequences with 2, 0 and 3 new tokens; max_qlen 3; row i of n sees ctx - n + i + 1
    ctx = [600, 50, 258]
    indptr = [0, 2, 2, 5]
    visible = [599, 600, 256, 257, 258]
    es, ml, tmp, expected = make_partials(visible, 2, 64, 3, PARTITION_SIZE, torch.float32, device)
    out = torch.full((5, 2, 64), float("nan"), dtype=torch.bfloat16, device=device)
    split_kv_reduce(
        out,
        es,
        ml,
        tmp,
        torch.tensor(ctx, dtype=torch.int32, device=device),
        qo_indptr=torch.tensor(indptr, dtype=torch.int32, device=device),
        max_qlen=3,
    )
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-2, atol=1e-2)


def test_reduce_strided_out(device):
    lens = [300, 513]
    es, ml, tmp, expected = make_partials(lens, 4, 64, 3, PARTITION_SIZE, torch.float32, device)
    fused = torch.full((2, 12, 64), float("nan"), dtype=torch.bfloat16, device=device)
    out = fused[:, 4:8]
    split_kv_reduce(out, es, ml, tmp, torch.tensor(lens, dtype=torch.int32, device=device))
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-2, atol=1e-2)
    assert torch.isnan(fused[:, :4]).all() and torch.isnan(fused[:, 8:]).all()


def _valid_args(device):
    out = torch.empty(2, 4, 64, dtype=torch.bfloat16, device=device)
    es = torch.rand(2, 4, 3, device=device)
    return dict(
        out=out,
        exp_sums=es,
        max_logits=torch.rand(2, 4, 3, device=device),
        tmp_out=torch.rand(2, 4, 3, 64, device=device),
        context_lens=torch.tensor([5, 700], dtype=torch.int32, device=device),
    )


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (lambda a: a.update(exp_sums=a["exp_sums"].double()), TypeError, "exp_sums"),
        (lambda a: a.update(max_logits=a["max_logits"][:, :, :2]), ValueError, "max_logits"),
        (lambda a: a.update(tmp_out=a["tmp_out"][..., :32]), ValueError, "tmp_out"),
        (lambda a: a.update(tmp_out=a["tmp_out"].to(torch.int32)), TypeError, "tmp_out"),
        (lambda a: a.update(context_lens=a["context_lens"].long()), TypeError, "context_lens"),
        (lambda a: a.update(context_lens=a["context_lens"][:1]), ValueError, "out"),
        (lambda a: a.update(out=a["out"][0]), ValueError, "out"),
        (lambda a: a.update(max_qlen=2), ValueError, "qo_indptr"),
        (lambda a: a.update(partition_size=300), ValueError, "partition_size"),
    ],
)
def test_reduce_rejects_bad_arguments(device, change, exc, match):
    args = _valid_args(device)
    change(args)
    with pytest.raises(exc, match=match):
        split_kv_reduce(**args)
