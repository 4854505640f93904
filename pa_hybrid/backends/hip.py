"""The "hip" backend: the split-KV C++ kernel of ``csrc/paged_decode_split_kv.cu``
compiled at first use by the runtime (NVRTC on NVIDIA, hipRTC on ROCm: never run there,
README "Platforms"), then the Triton reduce.

Best at low concurrency: CTAs per (partition, kv head, sequence) keep every SM busy
even with a handful of sequences. Each (query dtype, kv kind, head size, block size,
width, query rows) is its own template instantiation, compiled once and cached on disk;
GQA, qlen and the 8-bit scale kind (per-tensor or per-token) are run-time values. The wide
variant (twice the warps, one CTA per SM) runs tiny grids; the 32-row one (two MMA row
tiles sharing each K and V fragment) runs groups of 17-32 query rows (GQA x max_qlen:
speculative decoding, GQA 32). Larger groups, and 17-32 rows at head sizes without the
32-row variant, are cut into blocks of rows, a CTA each (:func:`row_blocking`).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

from .. import runtime
from ..call import SCALES_NONE, SCALES_PER_TOKEN, CallKey, DecodeCall
from ..kernels.common import gpu_shared_memory_per_program
from ..kernels.decode import LOG2E
from ..kernels.reduce import launch_split_kv_reduce
from ..layouts import KV_DTYPES
from .base import MAX_GRID_SEQS, SplitKvBackend, cuda_device_ok, shared_memory_limit, stream_evict_first

SOURCE = "paged_decode_split_kv.cu"
# Partitions double while each SM still gets one CTA (not two): longer walks amortize a
# CTA's start and merge. Measured on the H100 (RESULTS.md section 18): 1.6% less time
# over 89 calls against 2, up to 13% on long contexts with few sequences, never >1.5% more.
PROGRAMS_PER_SM = 1
# The balanced schedule's CTAs per SM, 16-bit and 8-bit caches (at most as many as fit):
# the best of 1, 2 and 4 on the H200 (RESULTS.md section 19); 8-bit tiles want more warps.
BALANCED_CTAS_PER_SM = (2, 4)
SM90_SMEM_PER_CTA = 227 * 1024  # the most shared memory one CTA may opt into on sm_90
SM90_SMEM_PER_SM = 228 * 1024  # of which sm_90 reserves 1 KB per resident CTA
SM90_SMEM_RESERVED_PER_CTA = 1024

MMA_ROWS = 16  # query rows of one mma.sync m16n8k16 tile
MAX_ROWS = 2 * MMA_ROWS  # the variants of two row tiles

_KV_KIND = {torch.float8_e4m3fn: 1, torch.int8: 2}  # 16-bit caches: 0
_TMP_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class SplitKvParams(ctypes.Structure):
    """Mirror of ``pa::SplitKvParams`` (csrc/paged_decode_split_kv.cu), passed by value."""

    _fields_ = [
        ("out", ctypes.c_void_p),
        ("exp_sums", ctypes.c_void_p),
        ("max_logits", ctypes.c_void_p),
        ("tmp_out", ctypes.c_void_p),
        ("q", ctypes.c_void_p),
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
        ("k_scale", ctypes.c_void_p),
        ("v_scale", ctypes.c_void_p),
        ("block_tables", ctypes.c_void_p),
        ("context_lens", ctypes.c_void_p),
        ("qo_indptr", ctypes.c_void_p),
        ("scale_log2", ctypes.c_float),
        ("partition_size", ctypes.c_int),
        ("write_out", ctypes.c_int),
        ("tmp_kind", ctypes.c_int),
        ("gqa", ctypes.c_int),
        ("max_qlen", ctypes.c_int),
        ("stride_q_row", ctypes.c_int64),
        ("stride_q_head", ctypes.c_int64),
        ("stride_out_row", ctypes.c_int64),
        ("stride_out_head", ctypes.c_int64),
        ("stride_es_row", ctypes.c_int64),
        ("stride_es_head", ctypes.c_int64),
        ("stride_tmp_row", ctypes.c_int64),
        ("stride_tmp_head", ctypes.c_int64),
        ("stride_tmp_part", ctypes.c_int64),
        ("stride_k_block", ctypes.c_int64),
        ("stride_k_head", ctypes.c_int64),
        ("stride_v_block", ctypes.c_int64),
        ("stride_v_head", ctypes.c_int64),
        ("stride_bt", ctypes.c_int64),
        ("stride_scale_block", ctypes.c_int64),
        ("stride_scale_head", ctypes.c_int64),
        ("per_token_scales", ctypes.c_int),
        ("table_width", ctypes.c_int),
        ("num_seqs", ctypes.c_int),
        ("max_seq_len", ctypes.c_int),
        ("stream_evict_first", ctypes.c_int),  # read K/V under an L2 evict-first policy
        ("row_blocks", ctypes.c_int),  # CTAs per kv head along the query rows (row_blocking)
    ]


@dataclass(frozen=True)
class TileTarget:
    """What the variants depend on besides their template arguments: compat.cuh's
    ``SMEM_PER_CTA`` and ``ASYNC_COPIES`` of the platform, and the head sizes compiled
    for it, with one and with two 16-row MMA tiles (tests/test_hip_backend.py and
    test_hip_rocm_compile.py compile every variant of both without spills)."""

    name: str
    smem_per_cta: int
    async_copies: bool
    head_sizes: tuple[int, ...]
    two_tile_head_sizes: tuple[int, ...]


# Two row tiles double O's accumulators: at head 256 they alone would take 256 registers.
SM90 = TileTarget("sm_90", SM90_SMEM_PER_CTA, async_copies=True, head_sizes=(64, 128, 256), two_tile_head_sizes=(64, 128))
# Never run on an AMD GPU (README "Platforms"). Head 256 spills to scratch there, and head 128
# with two row tiles: the MMA built from lane shuffles (compat_hip.cuh) needs more registers
# than a wave64 lane has.
GFX942 = TileTarget("gfx942", 64 * 1024, async_copies=False, head_sizes=(64, 128), two_tile_head_sizes=(64,))


@functools.lru_cache(maxsize=None)  # asked on every balanced call
def balanced_ctas_per_sm(head_size: int, block_size: int, kv_bytes: int, wanted: int) -> int:
    """CTAs per SM of the balanced schedule's kernel on sm_90 (its launch bounds; 16-row tiles
    only, see :func:`builds_balanced`): ``wanted``, or as many as shared memory lets reside at
    once (the schedule's grid is one wave)."""
    smem = kernel_config(head_size, block_size, kv_bytes)["smem_bytes"] + SM90_SMEM_RESERVED_PER_CTA
    return max(1, min(wanted, SM90_SMEM_PER_SM // smem))


def tile_target(arch: str) -> TileTarget:
    return GFX942 if arch.startswith("gfx") else SM90


def row_blocking(
    key: CallKey, target: TileTarget = SM90, smem_per_cta: int | None = None, one_tile: bool = False
) -> tuple[int, int]:
    """(the variant's ``ROWS``, row blocks) for the call's GQA x max_qlen query rows: blocks of
    two 16-row MMA tiles where the head size has them built and their shared memory fits
    ``smem_per_cta`` (unless ``one_tile``), else of one tile; one CTA per block, each reading
    the span's K and V (a group's blocks are neighbours in the grid, so that the second read
    can come from L2)."""
    rows = key.gqa * key.max_qlen
    if rows <= MMA_ROWS:
        return MMA_ROWS, 1
    two = not one_tile and key.head_size in target.two_tile_head_sizes
    if two and smem_per_cta is not None:
        two = kernel_config(key.head_size, key.block_size, key.kv_dtype.itemsize, False, target, MAX_ROWS)["smem_bytes"] <= smem_per_cta
    tile = MAX_ROWS if two else MMA_ROWS
    return tile, -(-rows // tile)


def prefers_one_tile(ctas: int, num_sms: int) -> bool:
    """Whether a group that :func:`row_blocking` puts in blocks of two tiles takes blocks of one
    instead, twice the CTAs (``ctas``: the two-tile grid): while the two-tile grid has at most
    one CTA per SM, where a CTA's latency is the call's. Measured on the H100 (RESULTS.md section 50):
    grids of 8-128 two-tile CTAs took 0.86-1.01x the time in one-tile CTAs, of 256 or more 1.01-1.25x."""
    return ctas <= num_sms


def kernel_config(
    head_size: int, block_size: int, kv_bytes: int, wide: bool = False, target: TileTarget = SM90, rows: int = MMA_ROWS
) -> dict:
    """Threads and dynamic shared memory of a variant: ``SplitKvConfig`` of the C++ source,
    restated (tests/test_hip_backend.py checks both agree, through static_asserts)."""
    kv_tile = head_size * block_size * kv_bytes
    stage = 2 * kv_tile + (2 * block_size * 4 if kv_bytes == 1 else 0)  # + per-token K and V scales
    stages = (3 if 2 * kv_tile <= 8192 else 2) if target.async_copies else 1

    def smem_bytes(warps: int) -> int:
        merge = warps * rows * (head_size + 8 + 2) * 4  # O rows padded by 8 floats, then max and sum
        return rows * (head_size + 8) * 2 + max(warps * stages * stage, merge)

    warps = (2 if 2 * kv_tile >= 32768 else 4) * (2 if wide else 1)
    while warps > 1 and smem_bytes(warps) > target.smem_per_cta:
        warps //= 2
    return {"threads": 32 * warps, "smem_bytes": smem_bytes(warps)}


@functools.lru_cache(maxsize=None)  # asked on every call
def wide_fits(
    head_size: int, block_size: int, kv_bytes: int, smem_per_cta: int = SM90_SMEM_PER_CTA, target: TileTarget = SM90,
    rows: int = MMA_ROWS,
) -> bool:  # fmt: skip
    """Whether the wide variant of these tiles has its twice the warps within the target's
    and the device's shared memory per CTA."""
    wide = kernel_config(head_size, block_size, kv_bytes, True, target, rows)
    narrow = kernel_config(head_size, block_size, kv_bytes, False, target, rows)
    return wide["threads"] == 2 * narrow["threads"] and wide["smem_bytes"] <= smem_per_cta


def use_wide_variant(
    ctas: int, num_sms: int, head_size: int, block_size: int, kv_bytes: int, smem_per_cta: int, target: TileTarget = SM90,
    rows: int = MMA_ROWS,
) -> bool:  # fmt: skip
    """The wide variant when the grid is tiny (at most one CTA per 16 SMs: the call is one
    CTA's latency) and its tiles fit. Measured on the H100 (RESULTS.md section 16): 0.4-0.9 us
    faster with 2-8 CTAs, even at 16-32, slower from 64 on; up to one CTA per SM no faster
    (section 39); on one-wave 8-bit grids of up to 2 CTAs per SM 4% slower (section 42)."""
    return 16 * ctas <= num_sms and wide_fits(head_size, block_size, kv_bytes, smem_per_cta, target, rows)


def template_args(q_dtype: torch.dtype, kv_dtype: torch.dtype, head_size: int, block_size: int, wide: bool, rows: int) -> str:
    """The variant: query dtype, kv kind, head size, block size, width, query rows (16 or 32;
    GQA and qlen are run-time values)."""
    is_bf16 = "true" if q_dtype == torch.bfloat16 else "false"
    return f"{is_bf16}, {_KV_KIND.get(kv_dtype, 0)}, {head_size}, {block_size}, {'true' if wide else 'false'}, {rows}"


def kernel_entry(q_dtype, kv_dtype, head_size: int, block_size: int, wide: bool, rows: int, balanced: int) -> str:
    """The kernel of a variant under the static split-KV schedule (``balanced`` 0) or the
    balanced one at ``balanced`` CTAs per SM."""
    args = template_args(q_dtype, kv_dtype, head_size, block_size, wide, rows)
    return f"pa::paged_decode_split_kv<{args}, {balanced}>"


def builds_balanced(arch: str, wide: bool, q_dtype: torch.dtype, kv_dtype: torch.dtype, rows: int) -> bool:
    """Whether a variant has the balanced schedule's kernel: not the wide ones (their tiny
    grids are never balanced), not on gfx942 (there it spills to scratch memory; never run
    there either), not fp16 queries over 8-bit caches (at 4 CTAs per SM the kernel has no
    register for their V unit, csrc; auto never balances 8-bit caches on hip anyway), not
    two row tiles (their accumulators need more registers than 4 CTAs per SM leave; and the
    balanced schedule pays from about 1.5 (sequence, kv head) pairs per SM, where auto's rule
    takes asm)."""
    return (
        not wide and rows == MMA_ROWS and not arch.startswith("gfx")
        and not (q_dtype == torch.float16 and kv_dtype.itemsize == 1)
    )  # fmt: skip


def kernel_spec(
    q_dtype, kv_dtype, head_size: int, block_size: int, wide: bool, rows: int, arch: str, balanced: int | None = None
) -> "runtime.KernelSpec":
    """One compile per variant, exporting the static schedule's kernel and, where built,
    the balanced one's at ``balanced`` CTAs per SM (by default the backend's)."""
    variant = (q_dtype, kv_dtype, head_size, block_size, wide, rows)
    schedules = [0]
    if builds_balanced(arch, wide, q_dtype, kv_dtype, rows):
        wanted = BALANCED_CTAS_PER_SM[kv_dtype.itemsize == 1] if balanced is None else balanced
        schedules.append(balanced_ctas_per_sm(head_size, block_size, kv_dtype.itemsize, wanted))
    return runtime.KernelSpec(source=SOURCE, entries=tuple(kernel_entry(*variant, b) for b in schedules), arch=arch)


def all_variants(target: TileTarget = SM90):
    """Every (q dtype, kv dtype, head size, block size, wide, rows) the backend can be asked
    for on the target."""
    for q_dtype in HipBackend.q_dtypes:
        for kv_dtype in (q_dtype, torch.float8_e4m3fn, torch.int8):
            for head_size in target.head_sizes:
                for block_size in HipBackend.block_sizes:
                    for rows in (MMA_ROWS, MAX_ROWS) if head_size in target.two_tile_head_sizes else (MMA_ROWS,):
                        yield q_dtype, kv_dtype, head_size, block_size, False, rows
                        if wide_fits(head_size, block_size, kv_dtype.itemsize, target.smem_per_cta, target, rows):
                            yield q_dtype, kv_dtype, head_size, block_size, True, rows


def warmup_specs(arch: str = "sm_90a"):
    """The kernel specs of every variant, for ``python -m pa_hybrid.runtime warmup``."""
    return [kernel_spec(*variant, arch) for variant in all_variants(tile_target(arch))]


@functools.lru_cache(maxsize=None)
def _loaded(q_dtype, kv_dtype, head_size: int, block_size: int, wide: bool, rows: int, balanced: int, device_index: int):
    """(function, threads, dynamic shared bytes) of one variant and schedule (``balanced``:
    0, or the balanced schedule's CTAs per SM) on one device: compiled (or read from the
    disk cache) and loaded once per process."""
    arch = runtime.arch_of(device_index)
    variant = (q_dtype, kv_dtype, head_size, block_size, wide, rows)
    spec = kernel_spec(*variant, arch, balanced or None)
    cfg = kernel_config(head_size, block_size, kv_dtype.itemsize, wide, tile_target(arch), rows)
    function = runtime.get_function(spec, device_index, kernel_entry(*variant, balanced))
    return function, cfg["threads"], cfg["smem_bytes"]


class HipBackend(SplitKvBackend):
    name = "hip"
    device_types = ("cuda",)
    kv_dtypes = KV_DTYPES
    head_sizes = (64, 128, 256)
    block_sizes = (16, 32)
    needs_alignment = True
    programs_per_sm = PROGRAMS_PER_SM
    # 2048-token partitions (a 2048-token context whole, no reduce) where they still give
    # every SM a CTA: 0.88-1.00x the time of 1024 (geomean 0.964) on the 70 uniform calls of
    # 4-256 sequences whose partition it changed (bf16 and fp8, H100, RESULTS.md section 37);
    # the ragged batches 0.98-1.03x, where 4096 would cost up to 1.40x
    max_partition = 2048
    balanced_programs_per_sm = BALANCED_CTAS_PER_SM
    # 8-bit caches: static 1024-token partitions took 0.985x the balanced schedule's time on
    # uniform 2048/8192-token batches (0.927 .. 1.021) and 0.963x on the ragged ones, once the
    # reduce loads only the partials a row can have (H100, RESULTS 30); 16-bit: 1.013x / 0.993x
    auto_balances_8bit = False

    def available(self, device_type, device_index):
        reason = runtime.unavailable_reason() or cuda_device_ok(device_index)
        if reason is None and torch.version.hip:
            arch = runtime.arch_of(device_index)
            if arch != GFX942.name:
                reason = f"the HIP half of csrc/compat.cuh is written for {GFX942.name} (CDNA3 MFMA), not {arch}"
        elif reason is None and torch.cuda.get_device_capability(device_index) < (8, 9):
            reason = "needs compute capability 8.9+ (mma.sync bf16 and packed fp8 converts)"
        return reason

    def _capability_reasons(self, key: CallKey):
        yield from super()._capability_reasons(key)
        target = GFX942 if torch.version.hip else SM90
        if torch.version.hip and key.head_size not in GFX942.head_sizes:
            yield f"head_size {key.head_size} is not built for {GFX942.name} (it spills to scratch there)"
        rows = key.gqa * key.max_qlen
        if key.num_kv_heads * -(-rows // MMA_ROWS) > MAX_GRID_SEQS:
            yield f"{key.num_kv_heads} kv heads x {-(-rows // MMA_ROWS)} blocks of 16 query rows exceed the grid's limit of {MAX_GRID_SEQS}"
        if not key.kv_is_8bit and key.kv_dtype != key.q_dtype:
            yield f"a 16-bit cache must have the query dtype ({key.q_dtype}), got {key.kv_dtype}"
        limit = shared_memory_limit(key)
        if limit is not None and key.head_size in self.head_sizes and key.block_size in self.block_sizes:
            need = kernel_config(key.head_size, key.block_size, key.kv_dtype.itemsize, target=target)["smem_bytes"]
            if need > limit:  # e.g. sm_89 and sm_120: 99 KB a CTA, where the tiles are sized for sm_90's 227 KB
                yield f"its tiles need {need} bytes of shared memory a CTA, this GPU allows {limit}"

    def offers_balanced(self, call: DecodeCall) -> bool:
        key = call.key  # one row block of one tile
        rows = key.gqa * key.max_qlen
        return rows <= MMA_ROWS and builds_balanced(runtime.arch_of(key.device_index), False, key.q_dtype, key.kv_dtype, MMA_ROWS)

    def balanced_per_sm(self, call: DecodeCall) -> int:
        key = call.key
        return balanced_ctas_per_sm(key.head_size, key.block_size, key.kv_dtype.itemsize, super().balanced_per_sm(call))

    def launch(self, call: DecodeCall, num_sms: int, partition_size: int, programs_per_head: int = 0) -> None:
        key = call.key
        target, smem_per_cta = tile_target(runtime.arch_of(key.device_index)), gpu_shared_memory_per_program(key.device_index)
        # the balanced kernels are built for blocks of one tile (builds_balanced)
        rows, row_blocks = row_blocking(key, target, smem_per_cta, one_tile=programs_per_head > 0)
        if programs_per_head:
            grid = (programs_per_head, key.num_kv_heads * row_blocks, 1)
        else:
            grid = (-(-key.max_seq_len // partition_size), key.num_kv_heads * row_blocks, call.num_seqs)
            if rows == MAX_ROWS and prefers_one_tile(grid[0] * grid[1] * grid[2], num_sms):
                rows, row_blocks = row_blocking(key, target, smem_per_cta, one_tile=True)
                grid = (grid[0], key.num_kv_heads * row_blocks, grid[2])
        wide = not programs_per_head and use_wide_variant(
            grid[0] * grid[1] * grid[2], num_sms, key.head_size, key.block_size, key.kv_dtype.itemsize, smem_per_cta,
            target, rows,
        )  # fmt: skip
        balanced = self.balanced_per_sm(call) if programs_per_head else 0
        function, threads, smem_bytes = _loaded(
            key.q_dtype, key.kv_dtype, key.head_size, key.block_size, wide, rows, balanced, key.device_index
        )
        split = programs_per_head > 0 or partition_size < key.max_seq_len
        exp_sums, max_logits, tmp_out = call.scratch() if split else (None, None, None)
        params = _params(call, partition_size, exp_sums, max_logits, tmp_out, row_blocks)
        runtime.launch(function, grid, threads, smem_bytes, [params])
        if split:
            launch_split_kv_reduce(
                call.out, exp_sums, max_logits, tmp_out, call.context_lens, call.qo_indptr, key.max_qlen, partition_size,
                key.max_seq_len, programs_per_head=programs_per_head, whole_written=True,
            )  # fmt: skip


def _params(call: DecodeCall, partition_size: int, exp_sums, max_logits, tmp_out, row_blocks: int = 1) -> SplitKvParams:
    """The kernel's arguments: partitions (static schedule) or pages (balanced) of
    ``partition_size`` tokens; without scratch, one partition that writes ``out``; the query
    rows in ``row_blocks`` blocks (:func:`row_blocking`)."""
    q, out = call.Q, call.out
    split = exp_sums is not None
    scaled = call.key.scales != SCALES_NONE
    per_token = call.key.scales == SCALES_PER_TOKEN
    return SplitKvParams(
        out=out.data_ptr(),
        exp_sums=exp_sums.data_ptr() if split else None,
        max_logits=max_logits.data_ptr() if split else None,
        tmp_out=tmp_out.data_ptr() if split else None,
        q=q.data_ptr(),
        k=call.K.data_ptr(),
        v=call.V.data_ptr(),
        k_scale=call.k_scale.data_ptr() if scaled else None,
        v_scale=call.v_scale.data_ptr() if scaled else None,
        block_tables=call.block_tables.data_ptr(),
        context_lens=call.context_lens.data_ptr(),
        qo_indptr=call.qo_indptr.data_ptr() if call.qo_indptr is not None else None,
        scale_log2=call.scale * LOG2E,
        partition_size=partition_size,
        write_out=0 if split else 1,
        tmp_kind=_TMP_KIND[tmp_out.dtype] if split else 0,
        gqa=call.key.gqa,
        max_qlen=call.key.max_qlen,
        stride_q_row=q.stride(0),
        stride_q_head=q.stride(1),
        stride_out_row=out.stride(0),
        stride_out_head=out.stride(1),
        stride_es_row=exp_sums.stride(0) if split else 0,
        stride_es_head=exp_sums.stride(1) if split else 0,
        stride_tmp_row=tmp_out.stride(0) if split else 0,
        stride_tmp_head=tmp_out.stride(1) if split else 0,
        stride_tmp_part=tmp_out.stride(2) if split else 0,
        stride_k_block=call.K.stride(0),
        stride_k_head=call.K.stride(1),
        stride_v_block=call.V.stride(0),
        stride_v_head=call.V.stride(1),
        stride_bt=call.block_tables.stride(0),
        stride_scale_block=call.k_scale.stride(0) if per_token else 0,
        stride_scale_head=call.k_scale.stride(1) if per_token else 0,
        per_token_scales=1 if per_token else 0,
        table_width=call.block_tables.shape[1],
        num_seqs=call.num_seqs,
        max_seq_len=call.key.max_seq_len,
        stream_evict_first=1 if stream_evict_first(call) else 0,
        row_blocks=row_blocks,
    )


BACKEND = HipBackend()
