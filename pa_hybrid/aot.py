"""Compile every Triton kernel of the package ahead of time for each GPU target, in
every variant the launchers pick for the benchmark's shapes, and report registers,
shared memory and spills. A compile error or a register spill fails the check.

    python -m pa_hybrid.aot [--targets gfx942 sm_90a] [--workload PATH] [--jobs N] [--verbose]

No GPU is needed: Triton compiles for a named target on the CPU (AMDGCN for gfx942,
PTX and a cubin for sm_90a). A spill is any register the compiler spilled: on gfx942
the VGPRs and SGPRs the code object's metadata counts (SGPRs spill into VGPR lanes,
VGPRs to scratch memory), on sm_90a the spill stores and loads of ptxas -v.

How the variants are found: the real launch paths run on ``meta`` tensors (shapes,
no memory) of the benchmark's shapes with every kernel replaced by a recorder, so
each ``kernel[grid](*args, **kwargs)`` is captured instead of run: the triton
backend's ``run`` (stage 1 and its reduce), the reduce the hip backend launches after
its stage 1 (under the static split-KV schedule and, where hip builds it, the balanced
one), the cache writes (copy, per-tensor and per-token quantization, both V
layouts), the layout conversions, the scale expansion and the bench's read-bandwidth
kernel. What a launcher asks of the device is answered for the target: its SM
counts (they size the split-KV partitions), its warp size (the decode tiles),
whether programmatic dependent launch is on (sm_90a only), compiled rather than
interpreted Triton. Triton's own binder then specializes each launch for the target
as the JIT does at a first call (argument types, integers equal to 1 folded in,
16-divisibility, AMD's 32-bit pointer ranges; on an H100 every kernel the JIT compiled
for a sample of the grid was one of these). Each distinct variant is compiled once
per target, in parallel worker processes; variants that differ only in whether an
integer argument is divisible by 16 share one compile (see :func:`enumerate_variants`).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import inspect
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, KernelInterface, create_function_from_signature

BENCH_WORKLOAD = {
    "head_size": 128,
    "block_size": 16,
    "query_dtype": "bfloat16",
    "models": {
        "llama3-8b": {"num_heads": 32, "num_kv_heads": 8},
        "qwen3-235b-tp4": {"num_heads": 16, "num_kv_heads": 1},
        "qwen3-235b": {"num_heads": 64, "num_kv_heads": 4},
    },
    "kv_dtypes": ["bfloat16", "float8_e4m3fn", "int8"],
    "num_seqs": [1, 4, 16, 32, 64, 128, 256, 512],
    "context_lens": [512, 2048, 8192, 32768],
    "max_tokens_per_case": 4194304,
    "mixed_lengths": {"num_seqs": 256, "min_len": 64, "max_len": 16384, "seed": 0},
}
"""The shapes of the decode benchmark's grid: mirrors ``../shared/bench/workload.json``
(which is not part of the package; ``--workload`` reads it instead)."""

KERNEL_MODULES = (
    "pa_hybrid.kernels.decode",
    "pa_hybrid.kernels.reduce",
    "pa_hybrid.kernels.cache_write",
    "pa_hybrid.kernels.layout_convert",
    "pa_hybrid.kernels.scales",
    "pa_hybrid.kernels.common",
    "pa_hybrid.bench.timing",
)
"""Every module of the package that defines ``@triton.jit`` functions."""


@dataclass(frozen=True)
class Target:
    """A GPU architecture to compile for, and what the launchers would learn from such a device."""

    name: str
    backend: str  # Triton's backend: "hip" or "cuda"
    arch: object  # Triton's GPUTarget arch: "gfx942" or 90
    warp_size: int
    sm_counts: tuple  # SMs (CUs) of the GPUs of this arch: they size the split-KV partitions
    shared_memory: int  # bytes one program may take (the decode tile's pipeline depth asks)
    dependent_launch: tuple  # what dependent_launch_ok can answer there

    def gpu_target(self) -> GPUTarget:
        return GPUTarget(self.backend, self.arch, self.warp_size)


def _dependent_launch_answers() -> tuple:
    from .kernels.common import TRITON_LAUNCHES_DEPENDENTS

    # PA_HYBRID_DEPENDENT_LAUNCH=0 turns it off, so both kinds of reduce can run on Hopper
    return (False, True) if TRITON_LAUNCHES_DEPENDENTS else (False,)


TARGETS = {
    # MI300X/MI325X (304 CUs), MI300A (228); ROCm never launches dependents (no gdc_wait)
    "gfx942": Target("gfx942", "hip", "gfx942", 64, (304, 228), 65536, (False,)),
    # H100 SXM and H200 (132 SMs), H100 PCIe (114); Triton compiles capability 90 as sm_90a
    "sm_90a": Target("sm_90a", "cuda", 90, 32, (132, 114), 232448, _dependent_launch_answers()),
}


# --------------------------------------------------------------------------- #
# The kernels and their launches
# --------------------------------------------------------------------------- #


def _is_triton_function(obj) -> bool:
    # JITFunction when compiled, InterpretedFunction under TRITON_INTERPRET=1
    return isinstance(obj, KernelInterface) and inspect.isfunction(getattr(obj, "fn", None))


def package_kernels() -> dict:
    """``{"module.name": function}`` for every ``@triton.jit`` function of :data:`KERNEL_MODULES`
    that no other one calls: the kernels launchers start (the rest are helpers they inline)."""
    functions = {}
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(module_name)
        for name, obj in vars(module).items():
            if _is_triton_function(obj) and obj.fn.__module__ == module_name:
                functions[f"{module_name}.{name}"] = obj
    called = set()
    for obj in functions.values():
        tree = ast.parse(textwrap.dedent(inspect.getsource(obj.fn)))
        names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        called |= {id(obj.fn.__globals__[n]) for n in names if n in obj.fn.__globals__ and n != obj.fn.__name__}
    return {name: obj for name, obj in functions.items() if id(obj) not in called}


@dataclass(frozen=True)
class Launch:
    """One recorded ``kernel[grid](*args, **kwargs)``."""

    kernel: str  # "module.name"
    function: object
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a kernel in its module and records its launches instead of running them."""

    def __init__(self, name, function, launches):
        self.name, self.function, self.launches = name, function, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(Launch(self.name, self.function, args, kwargs))


@contextlib.contextmanager
def _as_compiled_triton():
    """Launchers ask ``interpreting()`` (the dot operand dtype, software fp8 rounding);
    answer as a GPU process would, and so start compile workers in compiled mode."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


def record_launches(target: Target, workload: dict | None = None) -> list:
    """Every kernel launch of the package's launch paths for the shapes of ``workload``
    (default :data:`BENCH_WORKLOAD`), as a device of ``target`` would make them."""
    launches = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(_as_compiled_triton())
        for name, function in package_kernels().items():
            module, attr = name.rsplit(".", 1)
            stack.enter_context(mock.patch.object(sys.modules[module], attr, _Recorder(name, function, launches)))
        _run_launch_paths(target, workload or BENCH_WORKLOAD)
    return launches


def _meta(shape, dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


@contextlib.contextmanager
def _device_answers(target: Target, sms: int, dependent: bool):
    """What the launchers ask about the device (meta tensors have none), answered for a
    GPU of ``target`` with ``sms`` SMs."""
    from .backends import base
    from .backends import triton as triton_backend
    from .kernels import decode, reduce

    with mock.patch.object(base, "sm_count", lambda *_: sms), \
         mock.patch.object(triton_backend, "nvidia_device", lambda _: target.backend == "cuda"), \
         mock.patch.object(reduce, "dependent_launch_ok", lambda _: dependent), \
         mock.patch.object(decode, "warp_size_of", lambda _: target.warp_size), \
         mock.patch.object(decode, "shared_memory_per_program", lambda _: target.shared_memory), \
         mock.patch.object(decode, "nvidia_device", lambda _: target.backend == "cuda"):  # fmt: skip
        yield


def _run_launch_paths(target: Target, workload: dict) -> None:
    from .backends import base
    from .backends import hip as hip_backend
    from .backends import triton as triton_backend
    from .bench.decode import enumerate_cases
    from .bench.timing import READ_BANDWIDTH_CONFIGS, READ_CEILING_CONFIGS, _stream_read
    from .kernels.reduce import launch_split_kv_reduce
    from .layouts import PARTITION_SIZE

    for case in enumerate_cases(workload):
        for call in _decode_calls(case):
            key = call.key
            for sms in target.sm_counts:
                for dependent in target.dependent_launch:
                    with _device_answers(target, sms, dependent):
                        # Triton's stage 1 under auto and under balanced (a superset of auto's
                        # balanced launches: its 8-bit ones too)
                        for schedule in ("auto", "balanced"):
                            with mock.patch.dict(os.environ, PA_HYBRID_SPLIT_SCHEDULE=schedule):
                                triton_backend.BACKEND.run(call)
                        # the hip backend's stage 2 (backends/hip.py): the same reduce on its
                        # partitions, or on its pages under the balanced schedule (where it
                        # applies at all: PA_HYBRID_SPLIT_SCHEDULE=balanced, a superset of auto)
                        partition = hip_backend.BACKEND.partition_size(call, sms)
                        if partition < key.max_seq_len:
                            launch_split_kv_reduce(
                                call.out, *call.scratch(), call.context_lens, call.qo_indptr, key.max_qlen, partition,
                                key.max_seq_len,
                            )
                        programs = base.balanced_programs_per_head(
                            call.num_seqs, key.num_kv_heads, key.max_seq_len, sms, hip_backend.BACKEND.balanced_per_sm(call)
                        )
                        one_block = key.gqa * key.max_qlen <= hip_backend.MMA_ROWS  # as HipBackend.offers_balanced
                        if programs and one_block and hip_backend.builds_balanced(
                            target.name, False, key.q_dtype, key.kv_dtype, hip_backend.MMA_ROWS
                        ):
                            launch_split_kv_reduce(
                                call.out, *call.scratch(), call.context_lens, call.qo_indptr, key.max_qlen, PARTITION_SIZE,
                                key.max_seq_len, programs_per_head=programs,
                            )  # fmt: skip
    _run_cache_paths(workload)
    stream_configs = dict.fromkeys(READ_BANDWIDTH_CONFIGS + READ_CEILING_CONFIGS)
    largest_chunk = max(block * blocks for block, _, blocks in stream_configs)
    buffer = _meta(((2 << 30) // 4) // largest_chunk * largest_chunk, torch.int32)  # 2 GiB, as the bench reads
    for block, num_warps, blocks in stream_configs:
        _stream_read(buffer, _meta(buffer.numel() // (block * blocks), torch.int32), block, num_warps, blocks)


def _decode_calls(case):
    """The case's call as the bench makes it (8-bit caches: per-token scales), and with
    per-tensor scales (the ROCm API's ``*_QScale_hip``), on meta tensors."""
    from .call import build_call
    from .layouts import is_8bit, k_cache_shape, scale_shape, v_cache_shape

    blocks = [-(-n // case.block_size) for n in case.context_lens]
    num_blocks = sum(blocks)
    cache = (num_blocks, case.num_kv_heads, case.head_size, case.block_size, case.kv_dtype)
    common = dict(
        Q=_meta((case.num_seqs * case.max_qlen, case.num_heads, case.head_size), case.q_dtype),
        K=_meta(k_cache_shape(*cache), case.kv_dtype),
        V=_meta(v_cache_shape(*cache), case.kv_dtype),
        exp_sums=None,
        max_logits=None,
        tmp_out=None,
        block_tables=_meta((case.num_seqs, max(blocks)), torch.int32),
        context_lens=_meta((case.num_seqs,), torch.int32),
        block_tables_stride0=max(blocks),
        scale=case.head_size**-0.5,
        max_seq_len=max(case.context_lens),
        max_qlen=case.max_qlen,  # every sequence that many new tokens (build_call's qo_indptr)
    )
    if not is_8bit(case.kv_dtype):
        yield build_call(**common)
        return
    per_token = scale_shape(num_blocks, case.num_kv_heads, case.block_size)
    yield build_call(**common, K_QScale_asm=_meta(per_token, torch.float32), V_QScale_asm=_meta(per_token, torch.float32))
    yield build_call(**common, K_QScale_hip=_meta((1,), torch.float32), V_QScale_hip=_meta((1,), torch.float32))


def _run_cache_paths(workload: dict) -> None:
    """Cache writes of one decode step (one token per sequence), the layout conversions and
    the scale expansion, on caches of the grid's largest case."""
    from . import cache, layouts, quant

    head_size, block_size = workload["head_size"], workload["block_size"]
    q_dtype = getattr(torch, workload["query_dtype"])
    num_blocks = workload["max_tokens_per_case"] // block_size
    for heads in workload["models"].values():
        kv_heads = heads["num_kv_heads"]
        for kv_name in workload["kv_dtypes"]:
            kv_dtype = getattr(torch, kv_name)
            geometry = (num_blocks, kv_heads, head_size, block_size, kv_dtype)
            K = _meta(layouts.k_cache_shape(*geometry), kv_dtype)
            V = _meta(layouts.v_cache_shape(*geometry), kv_dtype)
            V_vllm = _meta((num_blocks, kv_heads, head_size, block_size), kv_dtype)
            scales = _meta(layouts.scale_shape(num_blocks, kv_heads, block_size), torch.float32)
            one = _meta((1,), torch.float32)
            for num_tokens in workload["num_seqs"]:
                key = _meta((num_tokens, kv_heads, head_size), q_dtype)
                slots = _meta((num_tokens,), torch.int64)
                for asm_layout, value_cache in ((True, V), (False, V_vllm)):
                    if not layouts.is_8bit(kv_dtype):
                        cache.reshape_and_cache(key, key, K, value_cache, slots, asm_layout=asm_layout)
                        continue
                    name = "int8" if kv_dtype == torch.int8 else "fp8"
                    for scale in (None, one):
                        cache.reshape_and_cache(key, key, K, value_cache, slots, name, scale, scale, asm_layout)
                    cache.reshape_and_cache_with_pertoken_quant(key, key, K, value_cache, scales, scales, slots, asm_layout)
            nhd = _meta((num_blocks, block_size, kv_heads, head_size), kv_dtype)
            layouts.shuffle_from_nhd(nhd, nhd)
            layouts.shuffle_from_vllm(K, V_vllm)
            layouts.unshuffle_to_nhd(K, V)
            layouts.unshuffle_to_vllm(K, V)
            quant.expand_per_tensor_scale(one, num_blocks, kv_heads, block_size)


# --------------------------------------------------------------------------- #
# Specialization: what the JIT would compile for a launch
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Variant:
    """One compilation of a kernel: what Triton's JIT keys its cache on."""

    kernel: str  # "module.name"
    signature: tuple  # (parameter, type) in order: "*bf16", "i32", "fp32", "constexpr", ...
    constexprs: tuple  # (parameter, value): declared constexprs and integers folded in (== 1)
    attrs: tuple  # (parameter, specialization): "D" divisible by 16, "S" 32-bit pointer range (AMD), "" none
    options: tuple  # (name, value): num_warps, num_stages, launch_pdl

    def code_shape(self) -> tuple:
        """The variant without the specializations of its integer arguments."""
        integers = {name for name, kind in self.signature if kind[0] in "iu"}
        pointer_attrs = tuple((name, spec) for name, spec in self.attrs if name not in integers)
        return (self.kernel, self.signature, self.constexprs, pointer_attrs, self.options)

    def fields(self) -> dict:
        """Everything that tells variants of one kernel apart, by name."""
        out = {name: kind for name, kind in self.signature if kind != "constexpr"}
        out.update({name: f"{out[name]}:{spec}" for name, spec in self.attrs if spec})
        out.update({name: _short(value) for name, value in self.constexprs})
        out.update(self.options)
        return out


def _short(value) -> str:
    return str(value).replace("triton.language.", "")


_BINDERS: dict = {}


def _binder(function, backend):
    """The JIT's argument binder of ``function`` for ``backend`` (it also applies
    ``do_not_specialize``); built from a JITFunction even under the interpreter."""
    key = (id(function), id(backend))
    if key not in _BINDERS:
        jit = function if isinstance(function, JITFunction) else JITFunction(function.fn, **function.kwargs)
        _BINDERS[key] = create_function_from_signature(jit.signature, jit.params, backend)
    return _BINDERS[key]


_BACKENDS: dict = {}


def _backend(target: Target):
    if target.name not in _BACKENDS:
        _BACKENDS[target.name] = make_backend(target.gpu_target())
    return _BACKENDS[target.name]


def specialize(kernel: str, function, args, kwargs, target: Target) -> Variant:
    """The variant the JIT compiles for ``function[grid](*args, **kwargs)`` on ``target``."""
    bound, specialization, options = _binder(function, _backend(target))(*args, **kwargs)
    names = list(bound)
    signature = tuple((name, spec[0]) for name, spec in zip(names, specialization))
    constexprs = tuple((name, bound[name]) for name, spec in zip(names, specialization) if spec[0] == "constexpr")
    attrs = tuple(
        (name, spec[1])
        for name, spec in zip(names, specialization)
        if spec[0] != "constexpr" and isinstance(spec[1], str)  # "" too, as the JIT keeps it
    )
    return Variant(kernel, signature, constexprs, attrs, tuple(sorted(options.items())))


def enumerate_variants(target: Target, workload: dict | None = None) -> list:
    """The variants to compile for every kernel launch on ``target``, in first-seen order.

    Launches that differ only in how an integer argument is specialized (divisible by 16
    or not) share one compile, with the specialization most of them have: it refines
    address arithmetic, while compiling each would double the time of the check."""
    groups: dict = {}
    for launch in record_launches(target, workload):
        variant = specialize(launch.kernel, launch.function, launch.args, launch.kwargs, target)
        groups.setdefault(variant.code_shape(), Counter())[variant] += 1
    return [counts.most_common(1)[0][0] for counts in groups.values()]


# --------------------------------------------------------------------------- #
# Compiling
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Report:
    """The outcome of compiling one variant for one target."""

    variant: Variant
    target: str
    registers: int | None = None  # per thread: VGPRs (AGPRs included) on AMD, registers on NVIDIA
    scalar_registers: int | None = None  # SGPRs (AMD only)
    shared_bytes: int | None = None  # shared memory (LDS) per program, as the launch requests it
    spills: int | None = None  # AMD: VGPRs + SGPRs spilled; NVIDIA: bytes of spill stores + loads
    scratch_bytes: int | None = None  # per-thread scratch (AMD private segment, NVIDIA stack frame)
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None or bool(self.spills)


def _amd_usage(amdgcn_text: str) -> dict:
    from .runtime.amdgcn import parse_kernels

    (kernel,) = parse_kernels(amdgcn_text)
    return dict(
        registers=kernel.vgprs,
        scalar_registers=kernel.sgprs,
        spills=kernel.vgpr_spills + kernel.sgpr_spills,
        scratch_bytes=kernel.scratch_bytes,
    )


def _nvidia_usage(ptx: str, capability: int) -> dict:
    """ptxas' verbose report on the PTX, from the ptxas Triton compiled it with (an older
    one on PATH may not read Triton's PTX version)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    from .runtime.usage import parse_ptxas_report

    with tempfile.TemporaryDirectory(prefix="pa_hybrid_aot_") as tmp:
        source, binary = Path(tmp) / "kernel.ptx", Path(tmp) / "kernel.cubin"
        source.write_text(ptx)
        command = [get_ptxas(capability).path, "-v", f"--gpu-name={sm_arch_from_capability(capability)}",
                   "-o", str(binary), str(source)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=True)
    (usage,) = parse_ptxas_report(done.stdout + done.stderr).values()
    return dict(
        registers=usage.registers,
        spills=usage.spill_store_bytes + usage.spill_load_bytes,
        scratch_bytes=usage.stack_bytes,
    )


def compile_variant(variant: Variant, target: Target) -> Report:
    """Compile ``variant`` for ``target`` and read its resource usage (in a compile worker:
    the kernel must be a real JITFunction, which needs TRITON_INTERPRET unset or 0)."""
    module, name = variant.kernel.rsplit(".", 1)
    kernel = getattr(importlib.import_module(module), name)
    if not isinstance(kernel, JITFunction):
        raise RuntimeError(f"{variant.kernel} is not compiled Triton here (TRITON_INTERPRET=1?); compile in a worker")
    backend = _backend(target)
    index = {param: i for i, (param, _) in enumerate(variant.signature)}
    source = ASTSource(
        kernel,
        dict(variant.signature),
        {(index[param],): value for param, value in variant.constexprs},
        {(index[param],): backend.parse_attr(spec) for param, spec in variant.attrs},
    )
    try:
        compiled = triton.compile(source, target=target.gpu_target(), options=dict(variant.options))
        if target.backend == "hip":
            usage = _amd_usage(compiled.asm["amdgcn"])
        else:
            usage = _nvidia_usage(compiled.asm["ptx"], target.arch)
    except Exception as e:  # any compiler failure is a finding, reported with its message
        message = f"{type(e).__name__}: {e}".strip()
        return Report(variant, target.name, error=message[-2000:])
    return Report(variant, target.name, shared_bytes=compiled.metadata.shared, **usage)


def compile_all(jobs: list, workers: int | None = None) -> list:
    """Compile ``[(variant, target), ...]`` in ``workers`` spawned processes (default: one
    per CPU), which import the kernels as compiled Triton. Reports come in job order."""
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    with _as_compiled_triton(), ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(compile_variant, variant, target) for variant, target in jobs]
        return [f.result() for f in futures]


def check(targets=("gfx942", "sm_90a"), workload: dict | None = None, workers: int | None = None) -> list:
    """Enumerate and compile every variant for each target; one :class:`Report` each."""
    jobs = [(v, TARGETS[t]) for t in targets for v in enumerate_variants(TARGETS[t], workload)]
    # the big decode kernels first, so that no worker is left with one at the end
    jobs.sort(key=lambda job: not job[0].kernel.endswith("_paged_decode_kernel"))
    return compile_all(jobs, workers)


# --------------------------------------------------------------------------- #
# Reporting
# --------------------------------------------------------------------------- #


def _span(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return str(values[0]) if min(values) == max(values) else f"{min(values)}-{max(values)}"


TABLE_LEGEND = (
    "regs: per thread (gfx942: VGPRs, AGPRs included); smem: shared memory (LDS) per program; "
    "scratch: per thread; spills: registers spilled (gfx942), bytes of spill stores and loads (sm_90a)"
)


def summary_table(reports: list) -> str:
    """One row per kernel and target: variants compiled, the ranges of registers, shared
    memory and scratch, spills and errors (see :data:`TABLE_LEGEND`)."""
    groups: dict = {}
    for r in reports:
        groups.setdefault((r.variant.kernel.rsplit(".", 1)[1], r.target), []).append(r)
    header = ("kernel", "target", "variants", "regs", "sgprs", "smem B", "scratch B", "spills", "errors")
    rows = [header]
    for (kernel, target), rs in sorted(groups.items()):
        ok = [r for r in rs if r.error is None]
        rows.append((
            kernel, target, str(len(rs)), _span(r.registers for r in ok), _span(r.scalar_registers for r in ok),
            _span(r.shared_bytes for r in ok), _span(r.scratch_bytes for r in ok),
            str(sum(r.spills or 0 for r in ok)), str(len(rs) - len(ok)),
        ))  # fmt: skip
    return _format(rows)


def variant_table(reports: list) -> str:
    """One row per variant and target, naming what sets the variant apart from its kernel's others."""
    differing: dict = {}
    for r in reports:
        fields = differing.setdefault(r.variant.kernel, {})
        for name, value in r.variant.fields().items():
            fields.setdefault(name, set()).add(value)
    rows = [("kernel", "target", "regs", "sgprs", "smem B", "spills", "variant")]
    for r in sorted(reports, key=lambda r: (r.variant.kernel, r.target)):
        varying = differing[r.variant.kernel]
        label = " ".join(f"{k}={v}" for k, v in r.variant.fields().items() if len(varying[k]) > 1)
        cells = (r.registers, r.scalar_registers, r.shared_bytes, r.spills)
        rows.append((r.variant.kernel.rsplit(".", 1)[1], r.target, *("-" if c is None else str(c) for c in cells),
                     "ERROR " + label if r.error else label))  # fmt: skip
    return _format(rows)


def _format(rows) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def failures(reports: list) -> str:
    """Each failed compile or spilling variant with its error, or "" when none failed."""
    lines = []
    for r in reports:
        if r.failed:
            what = r.error or f"spills ({r.spills}; registers {r.registers})"
            lines.append(f"{r.variant.kernel} on {r.target}: {what}\n    variant: {r.variant.fields()}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pa_hybrid.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="+", choices=sorted(TARGETS), default=sorted(TARGETS))
    parser.add_argument("--workload", type=Path, help="the benchmark's workload.json (default: the copy in this module)")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: one per CPU)")
    parser.add_argument("--verbose", action="store_true", help="also list every variant")
    args = parser.parse_args(argv)
    workload = json.loads(args.workload.read_text()) if args.workload else None
    start = time.perf_counter()
    reports = check(args.targets, workload, args.jobs)
    if args.verbose:
        print(variant_table(reports), end="\n\n")
    print(summary_table(reports))
    print(TABLE_LEGEND)
    print(f"{len(reports)} compiles in {time.perf_counter() - start:.0f} s")
    problems = failures(reports)
    if problems:
        print(problems, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
