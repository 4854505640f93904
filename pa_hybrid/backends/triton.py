"""The portable backend: split-KV decode in Triton (kernels/decode.py) + the Triton reduce.

Runs wherever Triton runs, including Triton's CPU interpreter (TRITON_INTERPRET=1),
which is how the test suite exercises it without a GPU.
"""

from __future__ import annotations

import os

from ..call import SCALES_PER_TENSOR, SCALES_PER_TOKEN, CallKey, DecodeCall
from ..kernels.common import nvidia_device
from ..kernels.decode import MAX_ROWS, SCALE_NONE, SCALE_PER_TENSOR, SCALE_PER_TOKEN, launch_paged_decode
from ..kernels.reduce import launch_split_kv_reduce
from ..layouts import KV_DTYPES, x_for
from .base import MAX_GRID_SEQS, SplitKvBackend, cuda_device_ok

PROGRAMS_PER_SM = 1
"""Measured on an H100 (benchmarks/RESULTS.md): 1 or 2 programs per SM were best for bulk
calls; 1 also keeps mid-size calls (e.g. 256 x 2048 tokens, 1 kv head) in one pass."""

_SCALE_KINDS = {SCALES_PER_TENSOR: SCALE_PER_TENSOR, SCALES_PER_TOKEN: SCALE_PER_TOKEN}


class TritonBackend(SplitKvBackend):
    name = "triton"
    device_types = ("cuda", "cpu")
    kv_dtypes = KV_DTYPES
    head_sizes = (64, 128, 256)
    block_sizes = (16, 32)
    # any GQA ratio and max_qlen the grids hold: groups of more than kernels/decode.MAX_ROWS
    # query rows take several programs (each reads the group's K and V)
    programs_per_sm = PROGRAMS_PER_SM
    # one program per 2048-token context (no partials, no stage 2) when that fills the GPU:
    # 0.92x / 0.90x the time of 1024-token partitions, bf16 / fp8, over the 11 such 2048-token
    # grid cases each (H100, benchmarks/RESULTS.md section 27); longer caps cost ragged batches
    whole_context_max = 2048

    def available(self, device_type, device_index):
        if device_type == "cpu":
            if os.environ.get("TRITON_INTERPRET", "0") != "1":
                return "CPU tensors run only under Triton's interpreter (set TRITON_INTERPRET=1 before importing triton)"
            return None
        return cuda_device_ok(device_index)

    # auto takes the balanced schedule (2 programs per SM) for 16-bit caches where hip's rule
    # does: on 27 bf16 cases of 32-512 sequences of 8192-32768 tokens, 0.996x the static
    # schedule's time (geomean; the mixed-length batches 0.94-1.00x, uniform ones up to
    # 1.025x); at 1, 4 or 8 programs per SM 1.41x, 1.007x, 1.018x. For 8-bit caches it lost
    # up to 9% on the mixed-length batches (H100, benchmarks/RESULTS.md section 43)
    auto_balances_8bit = False

    def _capability_reasons(self, key: CallKey):
        yield from super()._capability_reasons(key)
        # stage 1's axis 1 (kv heads x programs per group), which CUDA caps at 65535
        programs = key.num_kv_heads * -(-key.gqa * key.max_qlen // MAX_ROWS)
        if programs > MAX_GRID_SEQS:
            yield f"{programs} programs per sequence and partition exceed the grid's limit of {MAX_GRID_SEQS}"

    def offers_balanced(self, call: DecodeCall) -> bool:
        # measured on NVIDIA GPUs only (benchmarks/RESULTS.md section 43); the interpreter
        # runs it so that the tests cover it
        return call.key.device_type == "cpu" or nvidia_device(call.Q.device)

    def launch(self, call: DecodeCall, num_sms: int, partition_size: int, programs_per_head: int = 0) -> None:
        key = call.key
        common = dict(
            scale=call.scale,
            max_qlen=key.max_qlen,
            max_seq_len=key.max_seq_len,
            partition_size=partition_size,
            head_size=key.head_size,
            block_size=key.block_size,
            x=x_for(key.kv_dtype),
            gqa=key.gqa,
            num_sms=num_sms,
        )
        split = programs_per_head > 0 or partition_size < key.max_seq_len
        exp_sums, max_logits, tmp_out = call.scratch() if split else (None, None, None)
        launch_paged_decode(
            call.out, exp_sums, max_logits, tmp_out, call.Q, call.K, call.V, call.k_scale, call.v_scale,
            _SCALE_KINDS.get(key.scales, SCALE_NONE), call.block_tables, call.context_lens, call.qo_indptr,
            programs_per_head=programs_per_head, **common,
        )  # fmt: skip
        if split:
            launch_split_kv_reduce(
                call.out, exp_sums, max_logits, tmp_out, call.context_lens, call.qo_indptr, key.max_qlen,
                partition_size, key.max_seq_len, programs_per_head=programs_per_head, whole_written=True,
            )  # fmt: skip


BACKEND = TritonBackend()
