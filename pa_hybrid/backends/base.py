"""The interface every backend exposes to the dispatcher, and capability checks as data.

A backend declares what it covers as class data (dtypes, head and block sizes,
GQA and qlen ranges, scale kinds, device types); :meth:`Backend.supports` applies
one rule per field and returns every reason that fails, joined, or None.
:meth:`Backend.available` says whether it can run on a device at all (a missing
toolchain, driver or GPU), with the reason.
"""

from __future__ import annotations

import abc
import functools
import os

import torch
import triton

from ..call import CallKey, DecodeCall
from ..kernels.common import gpu_shared_memory_per_program
from ..layouts import PARTITION_SIZE


def _names(values) -> str:
    return ", ".join(str(v).replace("torch.", "") for v in values)


class Backend(abc.ABC):
    name: str = ""
    device_types: tuple = ("cuda",)
    q_dtypes: tuple = (torch.bfloat16, torch.float16)
    kv_dtypes: tuple = ()
    head_sizes: tuple | None = None  # None: any
    block_sizes: tuple | None = None
    max_gqa: int | None = None
    max_qlen: int | None = None
    scales: tuple = ("none", "per_tensor", "per_token")
    high_precision: tuple = (0, 1, 2)
    accepts_kernel_name: bool = False  # kernelName picks a row of the asm manifest
    needs_alignment: bool = False  # 16-byte K/V rows and 4-byte Q/out rows (CallKey.aligned)

    def available(self, device_type: str, device_index: int) -> str | None:
        """None if this backend can run on the device, else why not."""
        return None

    def supports(self, key: CallKey) -> str | None:
        reasons = [r for r in self._capability_reasons(key) if r]
        return "; ".join(reasons) if reasons else None

    def _capability_reasons(self, key: CallKey):
        yield None if key.device_type in self.device_types else f"runs on {_names(self.device_types)}, not {key.device_type}"
        yield None if key.q_dtype in self.q_dtypes else f"query dtype {_names([key.q_dtype])} not in ({_names(self.q_dtypes)})"
        yield None if key.kv_dtype in self.kv_dtypes else f"kv dtype {_names([key.kv_dtype])} not in ({_names(self.kv_dtypes)})"
        if self.head_sizes is not None and key.head_size not in self.head_sizes:
            yield f"head_size {key.head_size} not in ({_names(self.head_sizes)})"
        if self.block_sizes is not None and key.block_size not in self.block_sizes:
            yield f"block_size {key.block_size} not in ({_names(self.block_sizes)})"
        if self.max_gqa is not None and key.gqa > self.max_gqa:
            yield f"GQA ratio {key.gqa} above {self.max_gqa}"
        if self.max_qlen is not None and key.max_qlen > self.max_qlen:
            yield f"max_qlen {key.max_qlen} above {self.max_qlen}"
        if key.scales not in self.scales:
            yield f"{key.scales} scales not supported (only {_names(self.scales)})"
        if key.high_precision not in self.high_precision:
            yield f"high_precision={key.high_precision} not offered (only {_names(self.high_precision)})"
        if self.needs_alignment and not key.aligned:
            yield "needs 16-byte aligned K/V blocks and 4-byte aligned Q/out rows (pointers and strides)"
        if key.kernel_name is not None and not self.accepts_kernel_name:
            yield f"kernelName={key.kernel_name!r} names an asm kernel; only the asm backend takes it"

    @abc.abstractmethod
    def run(self, call: DecodeCall) -> None:
        """Compute ``call.out`` in place on the current stream, without a host sync."""


def shared_memory_limit(key: CallKey) -> int | None:
    """Shared memory one CTA may take on the call's GPU; None where there is no such GPU
    here (then ``available`` says why)."""
    if key.device_type != "cuda" or not torch.cuda.is_available() or key.device_index >= torch.cuda.device_count():
        return None
    return gpu_shared_memory_per_program(key.device_index)


@functools.lru_cache(maxsize=None)
def cuda_device_ok(device_index: int) -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if device_index >= torch.cuda.device_count():
        return f"cuda:{device_index} does not exist ({torch.cuda.device_count()} devices)"
    return None


CPU_PARALLELISM = 1024
"""What :func:`sm_count` reports for the CPU: large, so interpreted runs split into
256-token partitions and exercise the split-KV path."""


@functools.lru_cache(maxsize=None)
def sm_count(device_type: str, device_index: int) -> int:
    if device_type == "cuda":
        return torch.cuda.get_device_properties(device_index).multi_processor_count
    return CPU_PARALLELISM


EVICT_FIRST_MAX_BYTES = 256 << 20
"""The native kernels (asm, hip) read K/V (tiles and scales) under an L2 evict-first policy
on calls of at most this many K/V bytes (:func:`stream_bytes`), the normal policy above, on
GPUs not in :data:`EVICT_FIRST_MAX_BYTES_BY_GPU`. Measured on the H100 after the bench's L2
flush, which leaves L2 full of dirty lines: asm with evict-first took 0.955x / 0.963x the
time (bf16 / fp8, geomean) of the grid's calls of 16 MB to 256 MiB, and 1.015x / 1.018x of
the 10 larger ones, every one slower (reads of 512 MB and more lose bandwidth the longer they
run beside the dirty lines that evict-first keeps in L2); hip the same way, up to 13% faster
below and 1-2% slower above (benchmarks/RESULTS.md sections 33 and 34)."""

EVICT_FIRST_MAX_BYTES_BY_GPU = {"NVIDIA H200": None}
"""GPU name -> its :data:`EVICT_FIRST_MAX_BYTES` (None: evict-first on every call). The H200
(141 GB, 4.8 TB/s) gains from it at every size: asm on the grid's calls of more than 256 MiB,
+1.6 to +9.5 points of the floor with evict-first (RESULTS.md section 34)."""


@functools.cache
def _cuda_device_name(device_index: int) -> str:
    return torch.cuda.get_device_name(device_index)


def gpu_name(key: CallKey) -> str:
    """The name of the call's GPU (as torch reports it; empty off CUDA)."""
    return _cuda_device_name(key.device_index) if key.device_type == "cuda" else ""


def stream_bytes(call: DecodeCall) -> int:
    """The K and V bytes of ``call`` at most (every sequence as long as ``max_seq_len``)."""
    key = call.key
    return 2 * call.num_seqs * key.max_seq_len * key.num_kv_heads * key.head_size * call.K.element_size()


def stream_evict_first(call: DecodeCall) -> bool:
    """Whether a native kernel reads this call's K/V under the L2 evict-first policy."""
    limit = EVICT_FIRST_MAX_BYTES_BY_GPU.get(gpu_name(call.key), EVICT_FIRST_MAX_BYTES)
    return limit is None or stream_bytes(call) <= limit


MAX_PARTITION_SIZE = 1024
"""Longest split-KV partition by default (a backend may set its own ``max_partition``):
with ragged batches the partition is sized from ``max_seq_len`` alone (no host sync), so
long partitions would leave the few longest sequences' CTAs running alone (measured: the
mixed-length bf16 case of qwen3-235b-tp4 at 24% of the floor with 8192-token partitions
on an H100, and hip's fp8 case 1.40x slower with 4096-token partitions than with 1024,
RESULTS.md section 37)."""


def split_kv_partition_size(
    num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int, programs_per_sm: int,
    whole_context_max: int = MAX_PARTITION_SIZE, max_partition: int = MAX_PARTITION_SIZE,
) -> int:  # fmt: skip
    """Tokens per stage-1 CTA/program of a split-KV kernel: the longest multiple of 256
    (doubling, at most ``max_partition``) that still gives every SM
    ``programs_per_sm`` of them, so long walks amortize a pipeline's start when the
    batch alone fills the GPU, while short contexts or few sequences still split finely.
    Contexts of up to ``whole_context_max`` tokens are not split at all when one program
    per sequence and kv head already gives every SM ``programs_per_sm``. Never more
    partitions than the 256-token scratch holds; ``>= max_seq_len`` means one partition:
    write ``out``, skip stage 2."""
    partition = PARTITION_SIZE
    target = programs_per_sm * num_sms
    while (
        partition < min(max_seq_len, max_partition)
        and num_seqs * num_kv_heads * triton.cdiv(max_seq_len, 2 * partition) >= target
    ):
        partition *= 2
    if max_seq_len <= whole_context_max and num_seqs * num_kv_heads >= target:
        while partition < max_seq_len:
            partition *= 2
    return partition


BALANCED_MAX_SEQS = 1024
"""Most sequences for the balanced split-KV schedule: each stage-1 program and each
reduce program reads all of ``context_lens`` (the reduce's grid has ``num_seqs x
num_heads`` programs, so that traffic grows with the square of ``num_seqs``)."""


MAX_GRID_SEQS = 65535
"""Most sequences of a split-KV backend's call: the static schedule's grid has them as its
z dim, which CUDA (and HIP) cap at 65535."""


SPLIT_SCHEDULES = ("auto", "static", "balanced")

BALANCED_MIN_FILL = 0.75
"""``auto`` takes the balanced schedule when sequences x kv heads reach this fraction of
its grid's programs. With fewer, the static schedule already cuts every sequence into
about as many partitions as there are SMs, and the balanced one's pages, scan and longer
reduce cost up to 12% (H200, RESULTS.md section 20); with more, static partitions of
unequal sequences leave SMs idle, and the balanced one saved up to 19%."""


def split_schedule() -> str:
    """``PA_HYBRID_SPLIT_SCHEDULE``: ``auto`` (the default: the balanced schedule where
    :func:`balanced_programs_per_head` finds it pays), ``static`` (never balanced) or
    ``balanced`` (wherever it applies)."""
    schedule = os.environ.get("PA_HYBRID_SPLIT_SCHEDULE", "auto")
    if schedule not in SPLIT_SCHEDULES:
        raise ValueError(f"PA_HYBRID_SPLIT_SCHEDULE: expected one of {', '.join(SPLIT_SCHEDULES)}, got {schedule!r}")
    return schedule


def balanced_programs_per_head(
    num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int, programs_per_sm: int, auto: bool = False
) -> int:
    """Stage-1 programs per kv head of the balanced schedule (``kernels/common.py``,
    ``balanced_schedule``): ``programs_per_sm`` per SM over all kv heads, never more than
    there can be 256-token pages; 0 where the static schedule fits better: one partition
    covers every context (no stage 2 at all), every page would get a program of its own
    anyway (as the static schedule's 256-token partitions do, without a scan of the
    lengths), too many sequences, or (``auto``) too few (:data:`BALANCED_MIN_FILL`)."""
    if max_seq_len <= PARTITION_SIZE or num_seqs > BALANCED_MAX_SEQS:
        return 0
    if auto and num_seqs * num_kv_heads < BALANCED_MIN_FILL * num_sms * programs_per_sm:
        return 0
    programs = max(1, num_sms * programs_per_sm // num_kv_heads)
    return programs if num_seqs * triton.cdiv(max_seq_len, PARTITION_SIZE) > programs else 0


class SplitKvBackend(Backend):
    """A backend with a split-KV stage 1 and the Triton reduce: :meth:`run` picks the
    schedule (:meth:`balanced_programs`; static partitions sized by
    :func:`split_kv_partition_size` at ``programs_per_sm``), :meth:`launch` runs it."""

    programs_per_sm: int = 1
    whole_context_max: int = MAX_PARTITION_SIZE
    """Longest context a static-schedule program walks whole (see :func:`split_kv_partition_size`)."""
    max_partition: int = MAX_PARTITION_SIZE
    """Longest static-schedule partition of a longer context (:data:`MAX_PARTITION_SIZE`)."""
    balanced_programs_per_sm: tuple[int, int] = (2, 2)
    """Stage-1 programs per SM of the balanced schedule, for 16-bit and for 8-bit caches."""
    auto_balances_8bit: bool = True
    """Whether ``auto`` may take the balanced schedule for 8-bit caches (``balanced`` always may)."""

    def _capability_reasons(self, key: CallKey):
        yield from super()._capability_reasons(key)
        if key.concurrency > MAX_GRID_SEQS:
            yield f"{key.concurrency} sequences exceed {MAX_GRID_SEQS}, the GPU's limit of the stage-1 grid's z dim"
        if key.max_qlen > MAX_GRID_SEQS:  # the reduce's grid z dim: a program per new token
            yield f"max_qlen {key.max_qlen} exceeds {MAX_GRID_SEQS}, the GPU's limit of the reduce grid's z dim"

    def offers_balanced(self, call: DecodeCall) -> bool:
        """Whether the backend has the balanced schedule for this call's device."""
        return False

    def balanced_per_sm(self, call: DecodeCall) -> int:
        """Stage-1 programs per SM of this call under the balanced schedule."""
        return self.balanced_programs_per_sm[call.key.kv_is_8bit]

    def balanced_programs(self, call: DecodeCall, num_sms: int, static_partition: int) -> int:
        """Stage-1 programs per kv head of the balanced schedule for this call, or 0 for the
        static one (:func:`split_schedule`; ``static_partition``: :meth:`partition_size`)."""
        schedule = split_schedule()
        if schedule == "static" or not self.offers_balanced(call):
            return 0
        key = call.key
        auto = schedule == "auto"
        # auto, never where the static schedule writes out (one partition covers every
        # context, no reduce at all): at 512 tokens the balanced one took up to 1.47x the time
        if auto and (static_partition >= key.max_seq_len or (key.kv_is_8bit and not self.auto_balances_8bit)):
            return 0
        return balanced_programs_per_head(
            call.num_seqs, key.num_kv_heads, key.max_seq_len, num_sms, self.balanced_per_sm(call), auto
        )

    def run(self, call: DecodeCall) -> None:
        key = call.key
        num_sms = sm_count(key.device_type, key.device_index)
        partition = self.partition_size(call, num_sms)
        programs_per_head = self.balanced_programs(call, num_sms, partition)
        if programs_per_head:
            self.launch(call, num_sms, PARTITION_SIZE, programs_per_head)
        else:
            self.launch(call, num_sms, partition)

    def partition_size(self, call: DecodeCall, num_sms: int) -> int:
        """Tokens per stage-1 program under the static schedule."""
        key = call.key
        return split_kv_partition_size(
            call.num_seqs, key.num_kv_heads, key.max_seq_len, num_sms, self.programs_per_sm, self.whole_context_max,
            self.max_partition,
        )  # fmt: skip

    @abc.abstractmethod
    def launch(self, call: DecodeCall, num_sms: int, partition_size: int, programs_per_head: int = 0) -> None:
        """Stage 1 and, when it splits, the reduce, on a device of ``num_sms`` SMs: the static
        schedule with partitions of ``partition_size`` tokens, or with ``programs_per_head > 0``
        the balanced one with pages of ``partition_size`` tokens (``kernels/common.py``,
        ``balanced_schedule``)."""
