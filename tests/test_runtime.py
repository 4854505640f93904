"""pa_hybrid.runtime: NVRTC compile + disk cache (real compiles, no GPU needed), resource
usage, the command line, and loading/launching on the GPU (skipped without one).

Test kernels live in tests/data: vector_add.cu (+ vector_add.cuh), scaled_copy.cu
(configured by the generated prelude) and axpy.ptx (launched with a packed buffer).
They are CUDA C++ and PTX, so the GPU tests here need an NVIDIA GPU; the compile
tests need NVRTC only, and run beside a ROCm build of torch too where it is installed
(the ROCm half of the runtime, runtime/rocm.py, is tested in test_hip_rocm_compile.py)."""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import pytest
import torch
from conftest import nvrtc_unavailable_reason, requires_cuda_torch, requires_nvidia

from pa_hybrid import runtime
from pa_hybrid.runtime import __main__ as cli
from pa_hybrid.runtime import compiler, driver, env
from pa_hybrid.runtime.usage import parse_cuobjdump_usage, parse_ptxas_report

DATA = Path(__file__).parent / "data"
ARCH = "sm_90a"  # compile-only tests target the H100/H200 arch whatever the machine
_REASON = nvrtc_unavailable_reason()
needs_nvrtc = pytest.mark.skipif(_REASON is not None, reason=f"runtime unavailable: {_REASON}")
_RUNTIME_REASON = runtime.unavailable_reason()  # the same as _REASON on a CUDA build of torch
# the warmup command checks runtime.unavailable_reason() (hipRTC's on ROCm), then compiles with NVRTC
needs_runtime = pytest.mark.skipif(_RUNTIME_REASON is not None, reason=f"runtime unavailable: {_RUNTIME_REASON}")

# what the GPU tests need that only NVIDIA has
CUDA_KERNELS = "the test kernels are CUDA C++ for NVRTC (tests/data/vector_add.cu: cuda_fp16.h, -default-device)"
PTX = "loads tests/data/axpy.ptx (PTX, which HIP cannot load)"

ADD_FLOAT = "pa_test::vector_add<float>"
ADD_HALF = "pa_test::vector_add<__half>"
AXPY = "pa_test::axpy"
REVERSE = "pa_test::reverse_through_shared"


class AxpyArgs(ctypes.Structure):
    """pa_test::AxpyParams (vector_add.cuh), also the packed parameter buffer of axpy.ptx."""

    _fields_ = [("x", ctypes.c_void_p), ("y", ctypes.c_void_p), ("alpha", ctypes.c_float), ("n", ctypes.c_int32)]


def add_spec(arch=ARCH, source_dir=DATA, **kwargs) -> runtime.KernelSpec:
    return runtime.KernelSpec("vector_add.cu", (ADD_FLOAT, ADD_HALF, AXPY, REVERSE), arch, source_dir=source_dir, **kwargs)


def spilling_spec(arch=ARCH) -> runtime.KernelSpec:
    return runtime.KernelSpec(
        "vector_add.cu", "pa_test::register_hungry<128>", arch, options=("--maxrregcount=32",), source_dir=DATA
    )


def scaled_copy_spec(arch=ARCH, value_t="float") -> runtime.KernelSpec:
    return runtime.KernelSpec(
        "scaled_copy.cu",
        "scaled_copy",
        arch,
        types={"value_t": value_t},
        constants={"kScale": 2.5, "kAddOne": True},
        source_dir=DATA,
    )


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh, empty cache directory and memory cache for the test."""
    monkeypatch.setenv(env.CACHE_DIR_ENV, str(tmp_path / "cache"))
    compiler.clear_memory_cache()
    yield tmp_path / "cache"
    compiler.clear_memory_cache()


@pytest.fixture
def compiles(monkeypatch):
    """Counts NVRTC runs."""
    count = []
    real = compiler._nvrtc_compile

    def counting(*args):
        count.append(args[0].source)
        return real(*args)

    monkeypatch.setattr(compiler, "_nvrtc_compile", counting)
    return count


# --- specs ------------------------------------------------------------------------------


def test_spec_is_hashable_and_normalizes_lists_and_dicts():
    a = runtime.KernelSpec("k.cu", ["ns::k<1>"], ARCH, constants={"N": 4}, types=[["t", "float"]], options=["-DX=1"])
    b = runtime.KernelSpec("k.cu", ("ns::k<1>",), ARCH, constants=(("N", 4),), types=(("t", "float"),), options=("-DX=1",))
    assert a == b and hash(a) == hash(b) and a.name == b.name
    assert a.name.startswith("k-")
    assert runtime.KernelSpec("k.cu", "ns::k<2>", ARCH).name != runtime.KernelSpec("k.cu", "ns::k<1>", ARCH).name


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"source": "/abs/k.cu"}, "KernelSpec.source"),
        ({"source": "../k.cu"}, "KernelSpec.source"),
        ({"entries": ()}, "KernelSpec.entries"),
        ({"arch": "compute_90"}, "KernelSpec.arch"),
        ({"types": {"t": "int; } __global__ void evil() {"}}, "KernelSpec.types"),
        ({"constants": {"bad name": 1}}, "KernelSpec.constants"),
        ({"constants": {"N": float("nan")}}, "KernelSpec.constants['N']"),
        ({"includes": ('x.h"\n#define A',)}, "KernelSpec.includes"),
    ],
)
def test_spec_rejects_bad_fields_by_name(kwargs, field):
    args = {"source": "k.cu", "entries": ("k",), "arch": ARCH} | kwargs
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        runtime.KernelSpec(**args)


@pytest.mark.parametrize("option", ["--include-path=/x", "--pre-include=/x/a.h", "-include", "-isystem/x", "-I"])
def test_spec_rejects_include_options_the_cache_key_cannot_follow(option):
    with pytest.raises(ValueError, match=r"KernelSpec.options: name include directories as -I<dir>"):
        runtime.KernelSpec("k.cu", "k", ARCH, options=(option,))


def test_spec_rejects_a_string_constant():
    with pytest.raises(TypeError, match=r"KernelSpec.constants\['N'\]: expected bool, int or float"):
        runtime.KernelSpec("k.cu", "k", ARCH, constants={"N": "4"})


def test_prelude_holds_declarations_only():
    prelude = scaled_copy_spec().prelude()
    assert "constexpr float kScale = 2.5f;" in prelude
    assert "constexpr bool kAddOne = true;" in prelude
    assert "using value_t = float;" in prelude
    assert prelude.rstrip().endswith(f'#line 1 "{(DATA / "scaled_copy.cu").resolve()}"')
    big = runtime.KernelSpec("k.cu", "k", ARCH, constants={"BIG": 2**40}).prelude()
    assert f"constexpr long long BIG = {2**40}LL;" in big


# --- compiling ----------------------------------------------------------------------------


@needs_nvrtc
def test_compiles_template_instantiations_for_sm_90a(cache, compiles):
    kernel = runtime.compile_kernel(add_spec())
    assert compiles == ["vector_add.cu"] and not kernel.from_cache
    assert kernel.cubin.startswith(b"\x7fELF")
    # name expressions -> mangled names of exactly those instantiations
    assert kernel.symbol(ADD_FLOAT) == "_ZN7pa_test10vector_addIfEEvPKT_S3_PS1_i"
    assert kernel.symbol(ADD_HALF) == "_ZN7pa_test10vector_addI6__halfEEvPKT_S4_PS2_i"
    assert kernel.path.parent == cache / "nvrtc" / ARCH
    assert kernel.path.name.startswith(add_spec().name)
    with pytest.raises(ValueError, match="entry: vector_add.cu exports 4 entries"):
        kernel.symbol()
    with pytest.raises(ValueError, match="entry: 'nope' is not among"):
        kernel.symbol("nope")


@needs_nvrtc
def test_prelude_configures_the_source(cache):
    kernel = runtime.compile_kernel(scaled_copy_spec())
    assert kernel.symbol() == "scaled_copy"  # extern "C": the name expression is the symbol
    assert runtime.compile_kernel(scaled_copy_spec(value_t="double")).path != kernel.path


@needs_nvrtc
def test_constants_equal_in_python_but_not_in_cpp_are_two_variants(cache, compiles):
    """kScale = 2 (int) and 2.0 (float) compare equal as specs but are other C++ (here the
    same code, which an int divisor would not be): each gets its own build, never the other's."""
    as_int = runtime.KernelSpec("scaled_copy.cu", "scaled_copy", ARCH, types={"value_t": "float"},
                                constants={"kScale": 2, "kAddOne": True}, source_dir=DATA)  # fmt: skip
    as_float = dataclasses.replace(as_int, constants=(("kScale", 2.0), ("kAddOne", True)))
    assert as_int == as_float and as_int.name != as_float.name
    first, second = runtime.compile_kernel(as_int), runtime.compile_kernel(as_float)
    assert second is not first and second.spec is as_float and second.path != first.path
    assert "constexpr int kScale = 2;" in as_int.prelude() and "constexpr float kScale = 2.0f;" in as_float.prelude()
    assert len(compiles) == 2


@needs_nvrtc
def test_quoted_includes_never_come_from_the_current_directory(cache, tmp_path, monkeypatch):
    """A header of the same name in the current directory (another checkout's csrc/, say) is
    not what the source includes: the build and its cache entry are the source directory's."""
    sources, elsewhere = tmp_path / "src", tmp_path / "cwd"
    shutil.copytree(DATA, sources)
    elsewhere.mkdir()
    (elsewhere / "vector_add.cuh").write_text("#error the current directory's header was included\n")
    monkeypatch.chdir(elsewhere)
    kernel = runtime.compile_kernel(add_spec(source_dir=sources))  # would fail on the #error
    assert not kernel.from_cache


@needs_nvrtc
def test_unwritable_cache_compiles_into_memory_with_one_warning(tmp_path, monkeypatch, compiles):
    """A cache directory that cannot be created (here below a file; read-only or full disks
    alike) costs the disk cache only."""
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv(env.CACHE_DIR_ENV, str(tmp_path / "a_file" / "cache"))
    monkeypatch.setattr(compiler, "_warned_unwritable", set())
    compiler.clear_memory_cache()
    try:
        with pytest.warns(RuntimeWarning, match=r"cannot be written .* compiling into memory only .*PA_HYBRID_CACHE_DIR"):
            kernel = runtime.compile_kernel(add_spec())
        assert kernel.cubin.startswith(b"\x7fELF") and not kernel.from_cache
        compiler.clear_memory_cache()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per directory
            runtime.compile_kernel(add_spec(options=("-DUNUSED=1",)))
        assert len(compiles) == 2
    finally:
        compiler.clear_memory_cache()


@needs_nvrtc
def test_second_call_hits_memory_then_disk_without_recompiling(cache, compiles):
    first = runtime.compile_kernel(add_spec())
    assert runtime.compile_kernel(add_spec()) is first  # memory
    compiler.clear_memory_cache()
    again = runtime.compile_kernel(add_spec())  # disk
    assert again.from_cache and again.cubin == first.cubin and again.symbols == first.symbols
    assert again.usage == first.usage and again.log == first.log
    assert compiles == ["vector_add.cu"]
    runtime.compile_kernel(add_spec(options=("-DUNUSED=1",)))  # another option: another build
    assert len(compiles) == 2


@needs_nvrtc
def test_cache_key_follows_included_headers_and_nvrtc_version(cache, tmp_path, compiles, monkeypatch):
    sources = tmp_path / "src"
    shutil.copytree(DATA, sources)
    first = runtime.compile_kernel(add_spec(source_dir=sources))

    (sources / "unrelated.cuh").write_text("// included by nothing\n")
    compiler.clear_memory_cache()
    assert runtime.compile_kernel(add_spec(source_dir=sources)).path == first.path

    header = sources / "vector_add.cuh"
    header.write_text(header.read_text() + "\n// an edit\n")
    compiler.clear_memory_cache()
    edited = runtime.compile_kernel(add_spec(source_dir=sources))
    assert edited.path != first.path and not edited.from_cache
    assert first.path.exists()  # older builds stay; they are keyed apart

    monkeypatch.setattr(compiler, "nvrtc_version", lambda: (99, 0))
    compiler.clear_memory_cache()
    assert runtime.compile_kernel(add_spec(source_dir=sources)).path != edited.path
    assert len(compiles) == 3


@needs_nvrtc
def test_cache_entry_records_symbols_and_usage(cache):
    kernel = runtime.compile_kernel(add_spec())
    meta = json.loads(kernel.path.with_suffix(".json").read_text())
    assert meta["symbols"] == kernel.symbols
    assert set(meta["usage"]) >= set(kernel.symbols.values())
    assert str(DATA.resolve() / "vector_add.cuh") in meta["sources"]


@needs_nvrtc
def test_damaged_cache_entry_is_rebuilt(cache, compiles):
    kernel = runtime.compile_kernel(add_spec())
    kernel.path.write_bytes(kernel.cubin[: len(kernel.cubin) // 2])  # a torn file, as a non-atomic writer leaves
    compiler.clear_memory_cache()
    rebuilt = runtime.compile_kernel(add_spec())
    assert not rebuilt.from_cache and rebuilt.path.read_bytes() == kernel.cubin
    assert len(compiles) == 2


@needs_nvrtc
@pytest.mark.parametrize("damage", ["null", "usage renamed", "no log"])
def test_cache_entry_of_another_shape_is_rebuilt(cache, compiles, damage):
    kernel = runtime.compile_kernel(add_spec())
    meta_path = kernel.path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    if damage == "null":
        meta = None
    elif damage == "usage renamed":
        meta["usage"] = {name: {"regs": 1} for name in meta["usage"]}
    else:
        del meta["log"]
    meta_path.write_text(json.dumps(meta))
    compiler.clear_memory_cache()
    rebuilt = runtime.compile_kernel(add_spec())
    assert not rebuilt.from_cache and rebuilt.cubin == kernel.cubin and len(compiles) == 2


def test_atomic_write_leaves_old_file_or_new_one_never_a_part(tmp_path, monkeypatch):
    target = tmp_path / "entry.cubin"
    compiler.write_atomic(target, b"old")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry.cubin"]  # no temporary left behind

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(compiler.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        compiler.write_atomic(target, b"new" * 1000)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry.cubin"]


_CONCURRENT_COMPILE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from pa_hybrid.runtime import KernelSpec, compile_kernel
    spec = KernelSpec("vector_add.cu", ("pa_test::vector_add<float>",), "sm_90a", source_dir=sys.argv[2])
    print("ready", flush=True)
    while not Path(sys.argv[1]).exists():  # both processes start compiling at the same moment
        time.sleep(0.001)
    kernel = compile_kernel(spec)
    print("cached" if kernel.from_cache else "compiled", len(kernel.cubin))
    """
)


@needs_nvrtc
def test_concurrent_processes_compile_once_and_read_whole_files(cache, tmp_path):
    go = tmp_path / "go"
    environment = os.environ | {env.CACHE_DIR_ENV: str(cache)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _CONCURRENT_COMPILE, str(go), str(DATA)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
            cwd=Path(__file__).parents[1],
        )  # fmt: skip
        for _ in range(2)
    ]
    try:
        assert [p.stdout.readline().strip() for p in processes] == ["ready", "ready"]
        go.touch()
        outputs = [p.communicate(timeout=120) for p in processes]
    finally:
        for p in processes:
            p.kill()
    assert all(p.returncode == 0 for p in processes), outputs
    assert sorted(out.split()[0] for out, _ in outputs) == ["cached", "compiled"]
    assert len({out.split()[1] for out, _ in outputs}) == 1  # the reader got the whole cubin
    names = sorted(p.name for p in (cache / "nvrtc" / ARCH).iterdir())
    assert [n.rsplit(".", 1)[-1] for n in names] == ["cubin", "lock", "json"]  # no temporaries left


@needs_nvrtc
def test_compile_error_carries_log_and_options(cache):
    spec = runtime.KernelSpec(
        "scaled_copy.cu", "scaled_copy", ARCH, types={"value_t": "no_such_type"},
        constants={"kScale": 1, "kAddOne": False}, source_dir=DATA,
    )  # fmt: skip
    with pytest.raises(runtime.CompileError) as raised:
        runtime.compile_kernel(spec)
    message = str(raised.value)
    assert 'identifier "no_such_type" is undefined' in message  # NVRTC's log
    assert f"--gpu-architecture={ARCH}" in message and "-std=c++17" in message  # the options
    assert raised.value.log and raised.value.options[0] == f"--gpu-architecture={ARCH}"
    assert ".prelude" in raised.value.log  # the error points into the generated prelude


@needs_nvrtc
def test_missing_source_names_the_file(cache):
    with pytest.raises(FileNotFoundError, match="KernelSpec.source: .*missing.cu"):
        runtime.compile_kernel(runtime.KernelSpec("missing.cu", "k", ARCH, source_dir=DATA))


# --- resource usage -----------------------------------------------------------------------


@needs_nvrtc
def test_compile_reports_registers_and_no_spills(cache):
    kernel = runtime.compile_kernel(add_spec())
    for entry in (ADD_FLOAT, ADD_HALF, AXPY, REVERSE):
        usage = kernel.usage[kernel.symbol(entry)]
        assert usage.registers > 0 and usage.stack_bytes == 0 and not usage.spills
        assert usage.spill_store_bytes in (0, None)  # None: read from the cubin, not ptxas' report


@needs_nvrtc
def test_spilling_kernel_is_flagged(cache):
    kernel = runtime.compile_kernel(spilling_spec())
    usage = kernel.usage[kernel.symbol()]
    assert usage.registers <= 32 and usage.stack_bytes > 0 and usage.spills
    assert usage.spill_store_bytes is None or usage.spill_store_bytes > 0


@needs_nvrtc
@pytest.mark.skipif(env.find_tool("cuobjdump") is None, reason="cuobjdump not found (PATH, CUDA_HOME, Triton's tools)")
def test_resource_usage_of_a_cubin_with_cuobjdump(cache):
    kernel = runtime.compile_kernel(add_spec())
    found = runtime.resource_usage(kernel.cubin)
    for symbol, reported in kernel.usage.items():
        assert found[symbol].registers == reported.registers
        assert found[symbol].stack_bytes == 0 and not found[symbol].spills
    spilling = runtime.compile_kernel(spilling_spec())
    assert runtime.resource_usage(spilling.cubin)[spilling.symbol()].spills


@needs_nvrtc
@pytest.mark.skipif(env.find_tool("cuobjdump") is None, reason="cuobjdump not found (PATH, CUDA_HOME, Triton's tools)")
def test_usage_falls_back_to_the_cubin_without_ptxas_report(cache, monkeypatch):
    monkeypatch.setattr(compiler, "parse_ptxas_report", lambda log: {})  # a log without the report
    kernel = runtime.compile_kernel(spilling_spec())
    usage = kernel.usage[kernel.symbol()]
    assert usage.registers > 0 and usage.spill_store_bytes is None and usage.spills


@pytest.mark.skipif(env.find_tool("ptxas") is None, reason="ptxas not found (PATH, CUDA_HOME, Triton's tools)")
def test_resource_usage_of_ptx_with_ptxas():
    usage = runtime.resource_usage((DATA / "axpy.ptx").read_bytes(), arch=ARCH)["pa_test_axpy_ptx"]
    assert usage.registers > 0 and usage.spill_store_bytes == 0 and not usage.spills
    with pytest.raises(ValueError, match="arch: PTX"):
        runtime.resource_usage((DATA / "axpy.ptx").read_bytes())


def test_parsers_read_the_tools_formats():
    report = """\
ptxas info    : Function properties for _Z6helperv
ptxas         .     8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90a'
ptxas info    : Function properties for _Z1kPf
ptxas         .     16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 4096 bytes smem, 380 bytes cmem[0]
"""
    usage = parse_ptxas_report(report)
    assert list(usage) == ["_Z1kPf"]  # the non-entry helper is not a kernel
    assert usage["_Z1kPf"] == runtime.ResourceUsage(40, 16, 4096, 0, 0)
    assert not usage["_Z1kPf"].spills  # a stack frame without spills is a local array
    dump = """\
Resource usage:
 Common:
  GLOBAL:0
 Function _Z1kPf:
  REG:40 STACK:16 SHARED:4096 LOCAL:0 CONSTANT[0]:380 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    parsed = parse_cuobjdump_usage(dump)["_Z1kPf"]
    assert (parsed.registers, parsed.stack_bytes, parsed.shared_bytes) == (40, 16, 4096)
    assert parsed.spill_store_bytes is None and parsed.spills  # no spill counts: stack use counts as one


# --- availability, import, command line ---------------------------------------------------


@requires_cuda_torch("on ROCm the runtime's reason is hip-python's (runtime/rocm.py), cuda-python is not asked")
def test_unavailable_reason_without_cuda_python(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)  # makes the import fail
    runtime.unavailable_reason.cache_clear()
    runtime.driver_unavailable_reason.cache_clear()
    try:
        reason = runtime.unavailable_reason()
    finally:
        runtime.unavailable_reason.cache_clear()
        runtime.driver_unavailable_reason.cache_clear()
    assert reason is not None and "cuda-python is not installed" in reason and "pip install" in reason


def test_import_needs_no_cuda_python():
    code = (
        "import sys; sys.modules['cuda.bindings'] = None\n"
        "import pa_hybrid, pa_hybrid.runtime as r\n"
        "print(r.unavailable_reason())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120
    )
    assert done.returncode == 0, done.stderr
    if not torch.version.hip:  # on ROCm the reason is hip-python's (runtime/rocm.py): cuda-python is not asked
        assert "cuda-python is not installed" in done.stdout


def warmup_specs(arch):
    """A spec provider for the warmup command (python -m pa_hybrid.runtime warmup --specs ...)."""
    return [add_spec(arch), scaled_copy_spec(arch)]


def spilling_specs(arch):
    return [spilling_spec(arch)]


@needs_nvrtc
@needs_runtime
def test_warmup_command_fills_the_cache(cache, capsys):
    assert cli.main(["warmup", "--specs", "test_runtime:warmup_specs", "--arch", ARCH, "--no-spills"]) == 0
    out = capsys.readouterr().out
    assert "2 specs" in out and "0 failed" in out and ADD_HALF in out and "regs=" in out
    compiler.clear_memory_cache()
    assert all(r.kernel.from_cache for r in runtime.warmup(warmup_specs(ARCH)))


@needs_nvrtc
@needs_runtime
def test_warmup_command_fails_on_spills_and_compile_errors(cache, capsys):
    assert cli.main(["warmup", "--specs", "test_runtime:spilling_specs", "--arch", ARCH]) == 0
    assert cli.main(["warmup", "--specs", "test_runtime:spilling_specs", "--arch", ARCH, "--no-spills"]) == 1
    assert "SPILLS" in capsys.readouterr().out
    results = runtime.warmup([runtime.KernelSpec("scaled_copy.cu", "scaled_copy", ARCH, source_dir=DATA)])
    assert isinstance(results[0].error, runtime.CompileError) and results[0].kernel is None


def test_info_command(capsys):
    cli.main(["info"])
    out = capsys.readouterr().out
    assert "NVRTC:" in out and str(runtime.cache_dir()) in out


def test_packed_struct_layout_matches_the_kernels():
    # AxpyParams in vector_add.cuh and the .param list of axpy.ptx: x @0, y @8, alpha @16, n @20
    assert ctypes.sizeof(AxpyArgs) == 24
    assert [getattr(AxpyArgs, f).offset for f in ("x", "y", "alpha", "n")] == [0, 8, 16, 20]


@requires_cuda_torch("runtime/rocm.py's launch does not check its arguments (driver.py's does)")
def test_launch_refuses_untyped_and_host_arguments():
    # checked before anything reaches the driver, so no GPU is needed
    with pytest.raises(TypeError, match=r"args\[1\]: .*Python numbers have no C type"):
        runtime.launch(None, 1, 1, 0, [ctypes.c_int32(1), 3])
    with pytest.raises(ValueError, match=r"args\[0\]: a cpu tensor cannot be passed"):
        runtime.launch(None, 1, 1, 0, [torch.zeros(4)])
    with pytest.raises(TypeError, match="packed: expected a ctypes.Structure"):
        runtime.launch_packed(None, 1, 1, 0, bytearray(24))


# --- GPU: loading and launching -----------------------------------------------------------


def _add_args(a, b, out):
    return [a, b, out, ctypes.c_int32(a.numel())]


def _blocks(n, threads=128):
    return (n + threads - 1) // threads


@pytest.fixture
def gpu(cache):
    """The current CUDA device's index, with a fresh kernel cache."""
    return torch.cuda.current_device()


@requires_nvidia(CUDA_KERNELS)
@needs_nvrtc
def test_launch_with_listed_arguments(gpu):
    device = gpu
    spec = add_spec(arch=runtime.arch_of(device))
    for dtype, entry in ((torch.float32, ADD_FLOAT), (torch.float16, ADD_HALF)):
        a, b = (torch.randn(1000, device="cuda", dtype=dtype) for _ in range(2))
        out = torch.empty_like(a)
        function = runtime.get_function(spec, device, entry)
        runtime.launch(function, _blocks(1000), 128, 0, _add_args(a, b, out))
        torch.testing.assert_close(out, a + b)
    assert runtime.get_function(spec, device, ADD_FLOAT) is runtime.get_function(spec, device, ADD_FLOAT)


@requires_nvidia(CUDA_KERNELS)
@needs_nvrtc
def test_an_edited_source_runs_anew_after_the_memory_cache_is_cleared(gpu, tmp_path):
    """Functions are keyed by the compiled code, not the spec: a benchmark that swaps a
    kernel's source for an earlier version within one process runs each version."""
    device = gpu
    spec = runtime.KernelSpec("fill.cu", "pa_test::fill", runtime.arch_of(device), source_dir=tmp_path)
    out = torch.empty(32, device="cuda")
    for value in (1.0, 2.0):
        (tmp_path / "fill.cu").write_text(
            f"namespace pa_test {{ __global__ void fill(float* out) {{ out[threadIdx.x] = {value}f; }} }}\n"
        )
        compiler.clear_memory_cache()
        runtime.launch(runtime.get_function(spec, device), 1, 32, 0, [out])
        torch.testing.assert_close(out, torch.full_like(out, value))


@requires_nvidia(f"{CUDA_KERNELS}; {PTX}")
@needs_nvrtc
def test_launch_with_a_by_value_struct_and_a_packed_buffer(gpu):
    device = gpu
    x = torch.randn(3000, device="cuda")
    y = torch.randn(3000, device="cuda")
    expected = y + 2 * (0.5 * x) + 3 * x
    args = AxpyArgs(x.data_ptr(), y.data_ptr(), 0.5, 3000)
    axpy = runtime.get_function(add_spec(arch=runtime.arch_of(device)), device, AXPY)
    runtime.launch(axpy, _blocks(3000), 128, 0, [args])  # struct as the kernel's one parameter
    runtime.launch_packed(axpy, _blocks(3000), 128, 0, args)  # the same bytes as a packed buffer
    ptx = runtime.load_function(DATA / "axpy.ptx", "pa_test_axpy_ptx", device)
    assert runtime.load_function(DATA / "axpy.ptx", "pa_test_axpy_ptx", device) is ptx
    runtime.launch_packed(ptx, _blocks(3000), 128, 0, AxpyArgs(x.data_ptr(), y.data_ptr(), 3.0, 3000))
    torch.testing.assert_close(y, expected)


@requires_nvidia(CUDA_KERNELS)
@needs_nvrtc
def test_launch_follows_the_current_and_a_given_stream(gpu):
    device = gpu
    function = runtime.get_function(add_spec(arch=runtime.arch_of(device)), device, ADD_FLOAT)
    side = torch.cuda.Stream()
    for explicit in (False, True):
        x = torch.zeros(1 << 20, device="cuda")
        out = torch.empty_like(x)
        torch.cuda.synchronize()
        with torch.cuda.stream(side):
            torch.cuda._sleep(20_000_000)  # keeps the stream busy: a launch elsewhere would read x == 0
            x.fill_(1.0)
        if explicit:
            runtime.launch(function, _blocks(x.numel()), 128, 0, _add_args(x, x, out), stream=side)
        else:
            with torch.cuda.stream(side):
                runtime.launch(function, _blocks(x.numel()), 128, 0, _add_args(x, x, out))
        side.synchronize()
        assert bool((out == 2).all()), f"explicit stream={explicit}"


@requires_nvidia(f"{CUDA_KERNELS}; {PTX}")
@needs_nvrtc
def test_launches_are_captured_by_cuda_graphs(gpu):
    device = gpu
    add = runtime.get_function(add_spec(arch=runtime.arch_of(device)), device, ADD_FLOAT)
    ptx = runtime.load_function(DATA / "axpy.ptx", "pa_test_axpy_ptx", device)  # load before capture
    a, b = torch.randn(4096, device="cuda"), torch.randn(4096, device="cuda")
    out = torch.zeros_like(a)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        runtime.launch(add, _blocks(4096), 128, 0, _add_args(a, b, out))
        runtime.launch_packed(ptx, _blocks(4096), 128, 0, AxpyArgs(a.data_ptr(), out.data_ptr(), 2.0, 4096))
    torch.cuda.synchronize()
    assert bool((out == 0).all())  # captured, not run
    for _ in range(2):
        a.copy_(torch.randn_like(a))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, a + b + 2 * a)


@requires_nvidia(f"{CUDA_KERNELS}; the CUDA driver's opt-in above 48 KB")
@needs_nvrtc
def test_dynamic_shared_memory_above_48_kb(gpu):
    device = gpu
    function = runtime.get_function(add_spec(arch=runtime.arch_of(device)), device, REVERSE)
    n = 24 * 1024  # 96 KB of floats
    x = torch.randn(n, device="cuda")
    out = torch.empty_like(x)
    runtime.launch(function, 1, 256, 4 * n, [x, out, ctypes.c_int32(n)])
    torch.testing.assert_close(out, x.flip(0))
    with pytest.raises(ValueError, match="shared_bytes: .* cannot get 1048576 bytes"):
        runtime.launch(function, 1, 256, 1 << 20, [x, out, ctypes.c_int32(n)])


@requires_nvidia(f"{CUDA_KERNELS}; CUDA driver contexts (cuCtxGetCurrent)")
@needs_nvrtc
def test_launch_from_a_thread_without_a_current_context(gpu):
    device = gpu
    function = runtime.get_function(add_spec(arch=runtime.arch_of(device)), device, ADD_FLOAT)
    a, b = torch.randn(512, device="cuda"), torch.randn(512, device="cuda")
    out = torch.empty_like(a)
    torch.cuda.synchronize()
    seen = {}

    def worker():
        cuda = driver._cuda()
        stream = torch.cuda.current_stream(device)
        seen["before"] = int(cuda.cuCtxGetCurrent()[1])
        runtime.launch(function, _blocks(512), 128, 0, _add_args(a, b, out), stream=stream)
        seen["after"] = int(cuda.cuCtxGetCurrent()[1])

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, a + b)
    assert seen["after"] == seen["before"]  # the primary context was pushed for the launch only


@requires_nvidia(f"{CUDA_KERNELS}; NVRTC cubins and the CUDA driver's function attributes")
@needs_nvrtc
def test_driver_usage_agrees_with_the_compile_report(gpu):
    device = gpu
    for spec in (add_spec(arch=runtime.arch_of(device)), spilling_spec(arch=runtime.arch_of(device))):
        kernel = runtime.compile_kernel(spec)
        for entry, symbol in kernel.symbols.items():
            loaded = runtime.get_function(spec, device, entry).usage
            reported = kernel.usage[symbol]
            assert loaded.registers == reported.registers
            assert loaded.stack_bytes == reported.stack_bytes
            assert loaded.max_threads > 0


@requires_nvidia(f"{PTX}; the CUDA driver's PTX assembler log")
@needs_nvrtc
def test_broken_ptx_error_carries_the_assemblers_log():
    broken = (DATA / "axpy.ptx").read_bytes().replace(b"fma.rn.f32", b"fma.bogus.f32")
    with pytest.raises(runtime.DriverError, match="cuModuleLoadDataEx failed: CUDA_ERROR_INVALID_PTX(.|\n)*bogus"):
        runtime.load_function(broken, "pa_test_axpy_ptx", torch.cuda.current_device())
