"""The "asm" slot on ROCm: aiter's single-pass paged-attention code objects.

On a ROCm build of torch (``torch.version.hip``), backends/asm.py hands its slot to
this module. The kernels are the ones aiter ships in its ``amd-aiter`` wheel
(``aiter_meta/hsa/<arch>/pa/*.co``, listed in ``pa_asm.csv``; ``pip install
pa_hybrid[rocm]``), read from the installed distribution without importing
``aiter`` (its ``__init__`` pulls in its JIT and heavy dependencies). What mirrors
aiter, all from its 0.1.7.post2.dev18 wheel:

* the row choice (:func:`aiter_rule`): ``get_heuristic_kernel`` and ``pa_fwd`` in
  ``aiter_meta/csrc/py_itfs_cu/asm_pa.cu``;
* the argument buffer (:class:`AiterPaArgs`), grid and block: the ``KernelArgs``
  that ``pa_fwd`` packs and launches with ``HIP_LAUNCH_PARAM_BUFFER_POINTER``.

One workgroup of 4 wave64s per (kv head, sequence) serves the whole GQA group, as the
NVIDIA kernels do; our shuffled K/V layout is the one these kernels read.
"""

from __future__ import annotations

import csv
import ctypes
import functools
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import runtime
from ..call import SCALES_PER_TENSOR, CallKey, DecodeCall
from ..kernels.decode import LOG2E
from ..layouts import KV_DTYPES
from .base import Backend, cuda_device_ok

AITER_DISTRIBUTION = "amd-aiter"
AITER_VERSION = "0.1.7.post2.dev18"
"""The wheel whose launcher this module mirrors; another version may pack its
arguments or pick its rows differently, so it is refused rather than guessed at."""

AITER_FP8 = {"gfx942": torch.float8_e4m3fnuz, "gfx950": torch.float8_e4m3fn}
"""What aiter's "fp8" means per arch (aiter/utility/dtypes.py): its gfx942 kernels read
the fnuz flavour, so an e4m3fn cache cannot be given to them."""

THREADS = 256
"""4 wave64s: what pa_fwd launches, and each code object's ``.reqd_workgroup_size``."""


def _slot(name: str, ctype) -> list[tuple]:
    # aiter's launcher gives every argument a 16-byte slot: the value, then padding
    # (its p2/p3 fields after 8- and 4-byte values); the code objects' metadata agrees.
    return [(name, ctype), (f"_{name}_pad", ctypes.c_uint8 * (16 - ctypes.sizeof(ctype)))]


class AiterPaArgs(ctypes.Structure):
    """The argument buffer of aiter's pa kernels (``KernelArgs`` in asm_pa.cu), 256 bytes.
    Pointers are device addresses; strides are in bytes unless said otherwise. Some code
    objects declare only a prefix (240 bytes: no qo_indptr; 224: no gqa either, the
    gqa10 ones): HIP copies each declared argument from its offset in this buffer."""

    _fields_ = [
        *_slot("out", ctypes.c_uint64),  # [rows, num_heads, head_size], dense
        *_slot("q", ctypes.c_uint64),  # [rows, num_heads, head_size], heads adjacent
        *_slot("k", ctypes.c_uint64),  # shuffled [num_blocks, num_kv_heads, head_size // x, block_size, x]
        *_slot("v", ctypes.c_uint64),  # shuffled [num_blocks, num_kv_heads, block_size // x, head_size, x]
        *_slot("block_tables", ctypes.c_uint64),  # int32 [num_seqs, max_blocks_per_seq]
        *_slot("context_lens", ctypes.c_uint64),  # int32 [num_seqs]
        *_slot("k_scale", ctypes.c_uint64),  # fp32 [num_blocks, num_kv_heads, block_size], dense; 0 for 16-bit
        *_slot("v_scale", ctypes.c_uint64),
        *_slot("scale_log2", ctypes.c_float),  # softmax scale x log2(e)
        *_slot("block_table_stride", ctypes.c_uint32),  # elements between block-table rows
        *_slot("num_kv_heads", ctypes.c_uint32),  # the metadata labels this slot "batch"; pa_fwd stores num_kv_heads
        *_slot("q_row_bytes", ctypes.c_uint32),
        *_slot("kv_block_bytes", ctypes.c_uint32),  # K's, and V's: one pair for both
        *_slot("kv_head_bytes", ctypes.c_uint32),
        *_slot("gqa", ctypes.c_uint32),  # query heads per kv head
        *_slot("qo_indptr", ctypes.c_uint64),  # int32 [num_seqs + 1] with max_qlen > 1, else 0
    ]


@dataclass(frozen=True)
class AiterKernel:
    """One row of aiter's ``hsa/<arch>/pa/pa_asm.csv``."""

    q_dtype: torch.dtype  # qType
    kv_dtype: torch.dtype  # kvType
    gqa: int  # Gqa: the group it is built for
    mtp: int  # Mtp: 0 one query row per sequence; 1 several, through qo_indptr; 10 + n exactly n
    causal: bool  # Msk
    precision: int  # Hp: 0, 1 ("_hp"), 2 ("_uhp")
    block_size: int  # blkSz
    symbol: str  # knl_name
    file: str  # knl_file

    def serves(self, key: CallKey) -> str | None:
        """Why this row cannot run the call (for ``kernelName``), or None. High precision
        is not checked: aiter ignores it when the kernel is named."""
        wanted = [
            (self.q_dtype == key.q_dtype, f"query dtype {key.q_dtype}"),
            (self.kv_dtype == key.kv_dtype, f"kv dtype {key.kv_dtype}"),
            (self.block_size == key.block_size, f"block_size {key.block_size}"),
            (self.gqa in (key.gqa, _rounded_gqa(key.gqa)), f"GQA {key.gqa}"),
        ]
        if self.mtp == 0:
            wanted.append((key.max_qlen == 1, f"max_qlen {key.max_qlen} (it takes one query row per sequence)"))
        else:
            exact = self.mtp == 1 or key.max_qlen == self.mtp - 10
            wanted.append((key.max_qlen > 1 and exact, f"max_qlen {key.max_qlen} (it reads qo_indptr, mtp {self.mtp})"))
            wanted.append((self.causal, "causal query rows (it applies no mask)"))
        missing = [what for ok, what in wanted if not ok]
        return f"{self.symbol} does not serve {', '.join(missing)}" if missing else None


FIRST_IN_AITER_MAP = {
    "gfx942": ("_ZN5aiter35pa_bf16_pertokenFp8_gqa8_2tg_4w_uhpE", "_ZN5aiter31pa_fp16_pertokenFp8_gqa8_2tg_4wE"),
    "gfx950": ("_ZN5aiter34pa_bf16_pertokenFp8_gqa8_2tg_4w_hpE", "_ZN5aiter35pa_fp16_pertokenFp8_gqa8_2tg_4w_uhpE"),
}
"""With high_precision=1 aiter's rule accepts a row of any precision and takes the first
match in its config map, a std::unordered_map: libstdc++'s hash order, not the csv's.
Of this wheel's rows only the fp8 GQA-8 decode ones tie (plain, _hp, _uhp); these are
the ones aiter meets first (its generated config compiled with GCC 12's libstdc++)."""


def _rounded_gqa(gqa: int) -> int:
    return -(-gqa // 8) * 8


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@functools.cache
def code_object_dir(arch: str) -> Path | str:
    """The installed wheel's ``aiter_meta/hsa/<arch>/pa`` folder, or why there is none."""
    try:
        distribution = importlib.metadata.distribution(AITER_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return f"{AITER_DISTRIBUTION} is not installed: pip install pa_hybrid[rocm]"
    if distribution.version != AITER_VERSION:
        return (
            f"{AITER_DISTRIBUTION} {distribution.version} is installed, but this backend packs the arguments "
            f"of {AITER_VERSION}: pip install pa_hybrid[rocm]"
        )
    if arch not in AITER_FP8:
        return f"{AITER_DISTRIBUTION} ships paged-attention code objects for {', '.join(AITER_FP8)}, not {arch}"
    folder = Path(distribution.locate_file(f"aiter_meta/hsa/{arch}/pa"))
    if not (folder / "pa_asm.csv").is_file():
        return f"{folder / 'pa_asm.csv'} is missing from the installed {AITER_DISTRIBUTION}"
    return folder


@functools.cache
def manifest(arch: str) -> tuple[AiterKernel, ...] | str:
    """The rows of aiter's pa_asm.csv for ``arch``, in the file's order, or why none."""
    folder = code_object_dir(arch)
    if isinstance(folder, str):
        return folder
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8, "fp8": AITER_FP8[arch]}
    with open(folder / "pa_asm.csv", newline="") as f:
        return tuple(
            AiterKernel(
                q_dtype=dtypes[r["qType"]],
                kv_dtype=dtypes[r["kvType"]],
                gqa=int(r["Gqa"]),
                mtp=int(r["Mtp"]),
                causal=r["Msk"] == "1",
                precision=int(r["Hp"]),
                block_size=int(r["blkSz"]),
                symbol=r["knl_name"],
                file=r["knl_file"],
            )
            for r in csv.DictReader(f)
        )


def aiter_rule(kernels: tuple[AiterKernel, ...], key: CallKey) -> list[AiterKernel]:
    """The rows aiter's ``get_heuristic_kernel`` accepts at its first matching step: the
    exact qlen's kernel (mtp = max_qlen + 10), else any-qlen ones (mtp 1), with
    max_qlen > 1 (causal); mtp 0 otherwise; at each, the group itself, else rounded up to
    a multiple of 8; a row of the asked precision, or any when it is 1."""
    qlen_steps = (key.max_qlen + 10, 1) if key.max_qlen > 1 else (0,)
    for mtp in qlen_steps:
        for gqa in (key.gqa, _rounded_gqa(key.gqa)):
            rows = [
                k
                for k in kernels
                if (k.q_dtype, k.kv_dtype, k.gqa, k.mtp, k.causal, k.block_size)
                == (key.q_dtype, key.kv_dtype, gqa, mtp, key.max_qlen > 1, key.block_size)
                and key.high_precision in (1, k.precision)
            ]
            if rows:
                return rows
    return []


@functools.lru_cache(maxsize=4096)
def kernel_for(key: CallKey, arch: str) -> AiterKernel | str:
    """The row aiter runs for the call on ``arch`` (``kernelName`` if given), or why none."""
    kernels = manifest(arch)
    if isinstance(kernels, str):
        return kernels
    if key.kernel_name is not None:
        named = [k for k in kernels if k.symbol == key.kernel_name]
        if not named:
            return f"kernelName={key.kernel_name!r} is not in aiter's {arch} pa_asm.csv"
        return named[0].serves(key) or named[0]
    rows = aiter_rule(kernels, key)
    if len(rows) > 1:
        rows = [k for k in rows if k.symbol in FIRST_IN_AITER_MAP[arch]]
    if rows:
        return rows[0]
    kv = _dtype_name(key.kv_dtype)
    reason = (
        f"aiter's {arch} pa_asm.csv has no row for q {_dtype_name(key.q_dtype)}, kv {kv}, GQA {key.gqa}, "
        f"max_qlen {key.max_qlen}, block_size {key.block_size}, high_precision {key.high_precision}"
    )
    if key.kv_dtype in AITER_FP8.values() and key.kv_dtype != AITER_FP8[arch]:
        reason += f" (its fp8 kernels read {_dtype_name(AITER_FP8[arch])}, not {kv})"
    return reason


def pack_args(call: DecodeCall) -> AiterPaArgs:
    """The argument buffer for the call, as aiter's pa_fwd fills it, but with the call's
    softmax scale (pa_fwd always passes 1/sqrt(head_size))."""
    Q, K = call.Q, call.K
    return AiterPaArgs(
        out=call.out.data_ptr(),
        q=Q.data_ptr(),
        k=K.data_ptr(),
        v=call.V.data_ptr(),
        block_tables=call.block_tables.data_ptr(),
        context_lens=call.context_lens.data_ptr(),
        k_scale=call.k_scale.data_ptr() if call.k_scale is not None else 0,
        v_scale=call.v_scale.data_ptr() if call.v_scale is not None else 0,
        scale_log2=call.scale * LOG2E,
        block_table_stride=call.block_tables.stride(0),
        num_kv_heads=call.key.num_kv_heads,
        q_row_bytes=Q.stride(0) * Q.element_size(),
        kv_block_bytes=K.stride(0) * K.element_size(),
        kv_head_bytes=K.stride(1) * K.element_size(),
        gqa=call.key.gqa,
        qo_indptr=call.qo_indptr.data_ptr() if call.qo_indptr is not None else 0,
    )


class AiterAsmBackend(Backend):
    name = "asm"
    device_types = ("cuda",)  # torch's name for ROCm devices too
    kv_dtypes = KV_DTYPES + (torch.float8_e4m3fnuz,)
    head_sizes = (128,)  # no head size is passed; aiter's later paged_attention_common sends only 128 here
    max_qlen = 4  # aiter sends any max_qlen > 1 to its mtp kernels but tests them up to 4 (op_tests/test_pa_mtp.py)
    needs_alignment = True
    accepts_kernel_name = True

    def available(self, device_type, device_index):
        reason = cuda_device_ok(device_index)
        if reason is None:
            folder = code_object_dir(runtime.arch_of(device_index))
            reason = folder if isinstance(folder, str) else None
        if reason is None:
            reason = runtime.driver_unavailable_reason()
        return reason

    def _capability_reasons(self, key: CallKey):
        yield from super()._capability_reasons(key)
        if not key.row_strides_suffice:
            yield (
                "aiter's launcher passes Q's row stride and K's block and head strides only: it needs Q's heads "
                "adjacent, a dense out_, V with K's strides and dense per-token scales (CallKey.row_strides_suffice)"
            )
        if key.scales == SCALES_PER_TENSOR:
            yield "aiter's kernels read per-token scales (K_QScale_asm/V_QScale_asm), not per-tensor (K_QScale_hip)"
        if key.device_type == "cuda" and cuda_device_ok(key.device_index) is None:
            choice = kernel_for(key, runtime.arch_of(key.device_index))
            if isinstance(choice, str):
                yield choice
            elif choice.mtp > 1:  # its metadata declares no qo_indptr: a ragged batch would be misread
                yield f"{choice.symbol} takes exactly {choice.mtp - 10} query rows per sequence, not qo_indptr's"

    def run(self, call: DecodeCall) -> None:
        key = call.key
        arch = runtime.arch_of(key.device_index)
        kernel = kernel_for(key, arch)
        function = runtime.load_function(code_object_dir(arch) / kernel.file, kernel.symbol, key.device_index)
        runtime.launch_packed(function, (key.num_kv_heads, call.num_seqs), THREADS, 0, pack_args(call))


BACKEND = AiterAsmBackend()
