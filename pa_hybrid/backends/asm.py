"""The "asm" backend: single-pass PTX kernels (``asm/*.ptx``, listed in
``asm/manifest.csv``), loaded through the runtime (the driver assembles the PTX for
the device once per process) and launched with one packed argument block.

One CTA per (sequence, kv head) walks the whole context once: best when the batch
alone fills the GPU, and the home of per-token quantized (fp8/int8) caches.
"""

from __future__ import annotations

import csv
import ctypes
import functools
from dataclasses import dataclass

import torch

from .. import runtime
from ..call import SCALES_PER_TOKEN, CallKey, DecodeCall
from ..kernels.decode import LOG2E
from ..layouts import KV_DTYPES
from . import asm_aiter
from .base import Backend, cuda_device_ok, shared_memory_limit, sm_count, stream_evict_first


class AsmParams(ctypes.Structure):
    """The kernels' argument block (``ARGS`` of asm/generate.py; every PTX header lists it).
    Pointers are device addresses, strides are in bytes."""

    _fields_ = [
        ("out", ctypes.c_uint64),
        ("q", ctypes.c_uint64),
        ("k", ctypes.c_uint64),
        ("v", ctypes.c_uint64),
        ("k_scale", ctypes.c_uint64),
        ("v_scale", ctypes.c_uint64),
        ("block_tables", ctypes.c_uint64),
        ("context_lens", ctypes.c_uint64),
        ("qo_indptr", ctypes.c_uint64),
        ("q_row_bytes", ctypes.c_int64),
        ("q_head_bytes", ctypes.c_int64),
        ("out_row_bytes", ctypes.c_int64),
        ("out_head_bytes", ctypes.c_int64),
        ("k_block_bytes", ctypes.c_int64),
        ("k_head_bytes", ctypes.c_int64),
        ("v_block_bytes", ctypes.c_int64),
        ("v_head_bytes", ctypes.c_int64),
        ("scale_block_bytes", ctypes.c_int64),
        ("scale_head_bytes", ctypes.c_int64),
        ("block_table_row_bytes", ctypes.c_int64),
        ("scale_log2", ctypes.c_float),
        ("gqa", ctypes.c_int32),
        ("max_qlen", ctypes.c_int32),
        ("per_token_scales", ctypes.c_int32),
        ("table_len", ctypes.c_int32),  # block_tables.shape[1]
        ("max_seq_len", ctypes.c_int32),  # longer contexts count as this long
        ("stream_evict_first", ctypes.c_int32),  # read K/V under an L2 evict-first policy
    ]


@dataclass(frozen=True)
class AsmKernel:
    """One row of asm/manifest.csv."""

    q_dtype: torch.dtype
    kv_dtype: torch.dtype
    max_gqa: int
    max_qlen: int
    max_rows: int  # gqa * max_qlen query rows per kv head at most
    mask: str
    precision: tuple[int, ...]  # the high_precision levels it serves
    block_size: int
    head_size: int
    file: str
    entry: str
    threads: int
    shared_bytes: int

    def mismatch(self, key: CallKey) -> str | None:
        """Why this kernel cannot run the call, or None."""
        wanted = [
            (self.q_dtype == key.q_dtype, f"query dtype {key.q_dtype}"),
            (self.kv_dtype == key.kv_dtype, f"kv dtype {key.kv_dtype}"),
            (self.head_size == key.head_size, f"head_size {key.head_size}"),
            (self.block_size == key.block_size, f"block_size {key.block_size}"),
            (key.gqa <= self.max_gqa, f"GQA {key.gqa}"),
            (key.max_qlen <= self.max_qlen, f"max_qlen {key.max_qlen}"),
            (key.gqa * key.max_qlen <= self.max_rows, f"gqa x max_qlen = {key.gqa * key.max_qlen} rows"),
            (key.high_precision in self.precision, f"high_precision={key.high_precision}"),
        ]
        missing = [what for ok, what in wanted if not ok]
        return f"{self.entry} does not serve {', '.join(missing)}" if missing else None


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


@functools.cache
def manifest() -> tuple[AsmKernel, ...]:
    """The kernels, fewest query rows (then fewest threads) first."""
    with open(runtime.env.asm_dir() / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    kernels = [
        AsmKernel(
            q_dtype=_dtype(r["q_dtype"]),
            kv_dtype=_dtype(r["kv_dtype"]),
            max_gqa=int(r["max_gqa"]),
            max_qlen=int(r["max_qlen"]),
            max_rows=int(r["max_rows"]),
            mask=r["mask"],
            precision=tuple(int(p) for p in r["precision"].split(";")),
            block_size=int(r["block_size"]),
            head_size=int(r["head_size"]),
            file=r["file"],
            entry=r["entry"],
            threads=int(r["threads"]),
            shared_bytes=int(r["shared_bytes"]),
        )
        for r in rows
    ]
    return tuple(sorted(kernels, key=lambda k: (k.max_rows, k.threads)))


FOUR_WARPS_MIN_CTAS_PER_SM = {False: 0.25, True: 0.5}
"""By ``kv_is_8bit``: the fewest CTAs per SM for 4-warp CTAs (16-bit: 2 per SM, 8-bit: 4 per
SM) instead of 8-warp ones (16-bit: 1 per SM, 8-bit: 2). Below, one 8-warp CTA per SM keeps
twice the copies in flight: 16-bit calls of at most 32 CTAs took 1.14-1.20x the time with 4
warps at 2048 tokens and 1.27-1.47x from 8192 on, 8-bit 64-CTA ones 1.16x at 2048 tokens
(H100, RESULTS.md section 38)."""

FOUR_WARPS_MAX_LEN = 2048
"""Longest ``max_seq_len`` that runs 4-warp CTAs on grids of at least one CTA per SM. Measured
(H100, RESULTS.md section 38, 4 against 8 warps, time ratio): 16-bit 512-token calls of 256
to 512 CTAs 0.93-0.98x, of 1024+ CTAs 0.99x; 2048-token calls 0.96-1.00x; longer contexts
0.99-1.01x, and mixed lengths (a long context's CTA walking with half the warps) 1.01-1.21x.
8-bit: 512 tokens 0.93-0.99x, 2048 tokens 0.98-1.02x, longer and mixed 1.00-1.27x. Between
:data:`FOUR_WARPS_MIN_CTAS_PER_SM` and one CTA per SM, 4 warps are as fast or faster at every
length (16-bit 64 CTAs: 0.95-1.00x, 128 CTAs: 0.98-1.01x)."""


def prefers_four_warps(key: CallKey, ctas: int, num_sms: int) -> bool:
    """Whether the call runs 4-warp CTAs: on grids of at least :data:`FOUR_WARPS_MIN_CTAS_PER_SM`
    CTAs per SM and fewer than one per SM, or more with contexts of at most
    :data:`FOUR_WARPS_MAX_LEN` tokens; 8 warps otherwise (the rule within 0.1-0.2% of the
    faster width per call over the 189 grid calls measured, 2.2% at worst)."""
    if ctas < FOUR_WARPS_MIN_CTAS_PER_SM[key.kv_is_8bit] * num_sms:
        return False
    return ctas < num_sms or key.max_seq_len <= FOUR_WARPS_MAX_LEN


@functools.lru_cache(maxsize=4096)
def kernel_for(key: CallKey, four_warps: bool = False) -> AsmKernel | str:
    """The manifest row that runs the call, or why none does: ``kernelName`` if given,
    else the fewest query rows that hold the group, 4 warps wide if asked and there is
    such a kernel (see :func:`prefers_four_warps`), else 8. Cached per call key."""
    if key.kernel_name is not None:
        named = [k for k in manifest() if k.entry == key.kernel_name]
        if not named:
            return f"kernelName={key.kernel_name!r} is not in asm/manifest.csv"
        return named[0].mismatch(key) or named[0]
    fitting = [k for k in manifest() if k.mismatch(key) is None]
    if not fitting:
        return f"no kernel in asm/manifest.csv serves {key}"
    by_threads = [k for k in fitting if k.max_rows == fitting[0].max_rows]  # fewest threads first
    return by_threads[0] if four_warps else by_threads[-1]


class AsmBackend(Backend):
    name = "asm"
    device_types = ("cuda",)
    kv_dtypes = KV_DTYPES
    head_sizes = (128,)
    block_sizes = (16,)
    # GQA and max_qlen: any whose product is at most the largest kernel's rows (32)
    needs_alignment = True
    accepts_kernel_name = True

    def available(self, device_type, device_index):
        reason = cuda_device_ok(device_index)
        if reason is None and torch.cuda.get_device_capability(device_index) < (9, 0):
            reason = "its PTX targets sm_90 (compute capability 9.0+)"
        if reason is None:
            reason = runtime.driver_unavailable_reason()
        return reason

    def _capability_reasons(self, key: CallKey):
        yield from super()._capability_reasons(key)
        if not key.kv_is_8bit and key.kv_dtype != key.q_dtype:
            yield f"a 16-bit cache must have the query dtype ({key.q_dtype}), got {key.kv_dtype}"
        largest = max(k.max_rows for k in manifest())
        if key.gqa * key.max_qlen > largest:
            yield f"GQA x max_qlen = {key.gqa * key.max_qlen} query rows exceed the largest kernel's {largest}"
        elif key.kv_dtype in self.kv_dtypes and key.q_dtype in self.q_dtypes:
            choice = kernel_for(key)
            limit = shared_memory_limit(key)
            if isinstance(choice, str):
                yield choice
            elif limit is not None and choice.shared_bytes > limit:  # the kernels are sized for sm_90's 227 KB
                yield f"kernel {choice.entry} needs {choice.shared_bytes} bytes of shared memory a CTA, this GPU allows {limit}"

    def run(self, call: DecodeCall) -> None:
        key = call.key
        four_warps = prefers_four_warps(key, call.num_seqs * key.num_kv_heads, sm_count("cuda", key.device_index))
        kernel = kernel_for(key, four_warps)
        function = runtime.load_function(runtime.env.asm_dir() / kernel.file, kernel.entry, key.device_index)
        runtime.launch_packed(
            function, (call.num_seqs, key.num_kv_heads), kernel.threads, kernel.shared_bytes, params(call)
        )


def params(call: DecodeCall) -> AsmParams:
    q, out, K, V = call.Q, call.out, call.K, call.V
    per_token = call.key.scales == SCALES_PER_TOKEN
    k_scale, v_scale = call.k_scale, call.v_scale
    q_bytes, kv_bytes = q.element_size(), K.element_size()
    return AsmParams(
        out=out.data_ptr(),
        q=q.data_ptr(),
        k=K.data_ptr(),
        v=V.data_ptr(),
        k_scale=k_scale.data_ptr() if k_scale is not None else 0,
        v_scale=v_scale.data_ptr() if v_scale is not None else 0,
        block_tables=call.block_tables.data_ptr(),
        context_lens=call.context_lens.data_ptr(),
        qo_indptr=call.qo_indptr.data_ptr() if call.qo_indptr is not None else 0,
        q_row_bytes=q.stride(0) * q_bytes,
        q_head_bytes=q.stride(1) * q_bytes,
        out_row_bytes=out.stride(0) * q_bytes,
        out_head_bytes=out.stride(1) * q_bytes,
        k_block_bytes=K.stride(0) * kv_bytes,
        k_head_bytes=K.stride(1) * kv_bytes,
        v_block_bytes=V.stride(0) * kv_bytes,
        v_head_bytes=V.stride(1) * kv_bytes,
        scale_block_bytes=k_scale.stride(0) * 4 if per_token else 0,
        scale_head_bytes=k_scale.stride(1) * 4 if per_token else 0,
        block_table_row_bytes=call.block_tables.stride(0) * 4,
        scale_log2=call.scale * LOG2E,
        gqa=call.key.gqa,
        max_qlen=call.key.max_qlen,
        per_token_scales=1 if per_token else 0,
        table_len=call.block_tables.shape[1],
        max_seq_len=call.key.max_seq_len,
        stream_evict_first=1 if stream_evict_first(call) else 0,
    )


BACKEND = asm_aiter.BACKEND if torch.version.hip else AsmBackend()
"""On ROCm the asm slot runs aiter's code objects instead of this PTX (backends/asm_aiter.py)."""
