"""The longest-first order of the static split-KV schedule's stage-1 programs
(``kernels/common.py``, ``longest_first_partition``), which the Triton backend's stage 1
takes for split calls of up to ``LONGEST_FIRST_MAX_SEQS`` sequences: every non-empty
(sequence, partition) exactly once, whole partitions first, then the ragged ones by
descending length class, then items past the end that read as empty; and the backend,
so ordered, against the reference with partitions of 256 .. 1024 tokens on a ragged batch
whose last partitions fall in every length class."""

import math
import random
from unittest import mock

import pytest
import torch
import triton
import triton.language as tl

from pa_hybrid.backends.triton import TritonBackend
from pa_hybrid.kernels import decode
from pa_hybrid.kernels.common import longest_first_partition
from pa_hybrid.testing import make_decode_case

from conftest import DEVICE
from test_paged_attention_common import check_against_reference


@triton.jit
def _order_kernel(out_ptr, context_lens_ptr, num_seqs, max_seq_len, PARTITION: tl.constexpr,
                  TAIL_BUCKETS: tl.constexpr, BLOCK_S: tl.constexpr):  # fmt: skip
    item = tl.program_id(0)
    seq, part, context_len = longest_first_partition(
        context_lens_ptr, num_seqs, max_seq_len, item, PARTITION, TAIL_BUCKETS, BLOCK_S
    )
    tl.store(out_ptr + item * 3, seq)
    tl.store(out_ptr + item * 3 + 1, part)
    tl.store(out_ptr + item * 3 + 2, context_len)


def _order(lens, max_seq_len, partition, buckets):
    context_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    items = len(lens) * math.ceil(max_seq_len / partition)
    out = torch.full((items, 3), -7, dtype=torch.int32, device=DEVICE)
    block_s = triton.next_power_of_2(len(lens))
    _order_kernel[(items,)](out, context_lens, len(lens), max_seq_len, partition, buckets, block_s)
    return [tuple(row) for row in out.tolist()]


@pytest.mark.parametrize("partition, buckets", [(256, 1), (256, 2), (1024, 8)])
def test_every_partition_once_whole_first_then_longer_tails(partition, buckets):
    max_seq_len = 4 * partition
    # empty, exactly whole, one token past whole, every tail length class, and past max_seq_len
    lens = [0, partition, partition + 1, 3 * partition - 1, 5 * partition, 2 * partition, 1]
    lens += [random.randrange(0, max_seq_len + 1) for _ in range(13)]
    order = _order(lens, max_seq_len, partition, buckets)

    capped = [min(length, max_seq_len) for length in lens]
    expected = {(s, p) for s, n in enumerate(capped) for p in range(math.ceil(n / partition))}
    work = [(s, p, n) for s, p, n in order if n > 0]
    assert len(work) == len(expected) and {(s, p) for s, p, _ in work} == expected
    assert all(n == capped[s] for s, _, n in work)
    assert [n for *_, n in order[len(work) :]] == [0] * (len(order) - len(work))  # empties last

    def tokens(s, p):
        return min(partition, capped[s] - p * partition)

    whole = [(s, p) for s, p, _ in work if tokens(s, p) == partition]
    assert [(s, p) for s, p, _ in work[: len(whole)]] == sorted(whole)  # sequence order
    tail_classes = [math.ceil(tokens(s, p) * buckets / partition) for s, p, _ in work[len(whole) :]]
    assert tail_classes == sorted(tail_classes, reverse=True)
    assert all(p == capped[s] // partition for s, p, _ in work[len(whole) :])


@pytest.mark.parametrize("partition", [256, 512, 1024])
@pytest.mark.parametrize("kv_dtype, gqa, max_qlen", [(torch.bfloat16, 4, 1), (torch.float8_e4m3fn, 2, 2)])
def test_triton_backend_in_longest_first_order(partition, kv_dtype, gqa, max_qlen):
    max_seq_len = 3 * partition
    lens = [0, 1, partition, partition + 17, max_seq_len, 2 * partition - 5, 31, partition - 1, 777 % max_seq_len]
    assert len(lens) <= decode.LONGEST_FIRST_MAX_SEQS
    case = make_decode_case(lens, num_heads=2 * gqa, num_kv_heads=2, kv_dtype=kv_dtype, max_qlen=max_qlen, device=DEVICE)
    with mock.patch.object(TritonBackend, "partition_size", lambda self, call, num_sms: partition):
        check_against_reference(case, "triton", give_scratch=True)
