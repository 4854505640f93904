"""Compile C++ kernel sources with NVRTC at first use; cache them in memory and on disk.

A :class:`KernelSpec` names one variant by compile-time parameters only (never batch
sizes or lengths): a source file, its entry points as NVRTC name expressions (template
arguments spelled out, e.g. ``"pa::paged_decode_split_kv<true, 0, 128, 16, false, 0>"``), a
generated prelude (headers, ``constexpr`` constants, type aliases) put in front of the
file, the architecture and extra options. Its ``name`` (a hash of every field, which tells
``2``, ``2.0`` and ``True`` apart where ``==`` does not) is the in-memory key and starts the
disk file name.

:func:`compile_kernel` looks in memory, then on disk
(``<cache>/nvrtc/<arch>/<spec.name>-<digest>.cubin`` and ``.json``, the digest covering
the prelude, the content of the source and of every header it includes, the options,
the arch and the NVRTC version), then runs NVRTC. Compiling holds a file lock, so
concurrent processes build a variant once; files are written to a temporary name in
the same directory and renamed (``os.replace``), the JSON last, so a reader that finds
the JSON finds a whole cubin (it also checks the cubin's hash). Edited headers are
picked up by the next process: the memory cache is per process. A cache directory that
cannot be written (read-only, full) costs only the disk cache: kernels are then compiled
into this process's memory, with one warning.

The prelude and the program are named by absolute paths in the source's directory, so
NVRTC resolves the source's quoted includes there, never in the current directory, which
the digest would not cover.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .env import CACHE_DIR_ENV, csrc_dir, cuda_include_dir, find_tool, kernel_cache_dir
from .usage import ResourceUsage, parse_ptxas_report, resource_usage

CACHE_FORMAT = 1  # bump when the files' layout or the options the runtime adds change
RUNTIME_OPTIONS = (
    "-std=c++17",
    "-default-device",  # unannotated functions in csrc/ are device code
    "--ptxas-options=-v",  # registers and spills into the log, read by parse_ptxas_report
)

_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")
_TYPE_NAME = re.compile(r"[\w:<>,\s*&]+")  # a type, never a statement or a body
_HEADER_NAME = re.compile(r"[\w./-]+")
_ARCH = re.compile(r"sm_\d+a?|gfx[0-9a-f]+")  # NVIDIA, or an AMD target (hipRTC, amdgcn.py)
_UNTRACKED_INCLUDE_OPTIONS = ("--include-path", "--pre-include", "-include", "-isystem")
_INCLUDE = re.compile(rb'^\s*#\s*include\s*[<"]([^>"]+)[>"]', re.MULTILINE)


class CompileError(RuntimeError):
    """NVRTC rejected a source; the message holds the options and NVRTC's log."""

    def __init__(self, spec: "KernelSpec", options: tuple[str, ...], log: str, result: str, hint: str = ""):
        self.spec, self.options, self.log = spec, options, log
        message = (
            f"NVRTC could not compile {spec.source} ({result}) for entries {list(spec.entries)}\n"
            f"options: {' '.join(options)}\nlog:\n{log.strip() or '(empty)'}"
        )
        super().__init__(message + (f"\n{hint}" if hint else ""))


def _as_tuple(value, field: str) -> tuple:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, dict):
        return tuple(value.items())
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"KernelSpec.{field}: expected a tuple, list or dict, got {type(value).__name__}")
    return tuple(tuple(v) if isinstance(v, list) else v for v in value)


@dataclass(frozen=True)
class KernelSpec:
    """One compiled variant of a kernel source.

    source      file name relative to ``source_dir`` (default: the package's csrc/)
    entries     NVRTC name expressions of the kernels to export, e.g. "ns::k<128, true>"
    arch        the real architecture to build for: "sm_90a" on H100/H200, "gfx942" on MI300
    includes    headers the prelude includes first (so its aliases can name their types)
    constants   (name, bool | int | float) pairs -> ``constexpr`` in the prelude
    types       (name, type) pairs -> ``using name = type;`` in the prelude
    options     extra NVRTC options, e.g. "-DNAME=1", "--use_fast_math", "-I<dir>" (include
                directories only as -I<dir>: the digest hashes the headers found there)
    source_dir  the directory of ``source`` and first include directory (tests use it)

    Lists and dicts are accepted and stored as tuples, so a spec is hashable.
    """

    source: str
    entries: tuple[str, ...]
    arch: str
    includes: tuple[str, ...] = ()
    constants: tuple[tuple[str, bool | int | float], ...] = ()
    types: tuple[tuple[str, str], ...] = ()
    options: tuple[str, ...] = ()
    source_dir: str | None = None

    def __post_init__(self):
        for field in ("entries", "includes", "constants", "types", "options"):
            object.__setattr__(self, field, _as_tuple(getattr(self, field), field))
        if self.source_dir is not None:
            object.__setattr__(self, "source_dir", os.fspath(self.source_dir))
        if Path(self.source).is_absolute() or ".." in Path(self.source).parts:
            raise ValueError(f"KernelSpec.source: expected a file name relative to the source dir, got {self.source!r}")
        if not self.entries or not all(isinstance(e, str) and e.strip() for e in self.entries):
            raise ValueError(f"KernelSpec.entries: expected one or more name expressions, got {self.entries!r}")
        if not _ARCH.fullmatch(self.arch):
            raise ValueError(f"KernelSpec.arch: expected a real architecture like 'sm_90a', 'sm_89' or 'gfx942', got {self.arch!r}")
        for header in self.includes:
            if not _HEADER_NAME.fullmatch(header):
                raise ValueError(f"KernelSpec.includes: expected header file names, got {header!r}")
        for item in self.constants:
            _check_constant(item)
        for item in self.types:
            if len(item) != 2 or not _IDENTIFIER.fullmatch(item[0]) or not _TYPE_NAME.fullmatch(item[1]):
                raise ValueError(f"KernelSpec.types: expected (identifier, type name) pairs, got {item!r}")
        if not all(isinstance(o, str) for o in self.options):
            raise TypeError(f"KernelSpec.options: expected strings, got {self.options!r}")
        for option in self.options:
            if option == "-I" or option.startswith(_UNTRACKED_INCLUDE_OPTIONS):
                raise ValueError(
                    f"KernelSpec.options: name include directories as -I<dir> (the cache key hashes the headers "
                    f"found there; other include options would let an edited header load a stale build), got {option!r}"
                )

    @functools.cached_property
    def name(self) -> str:
        """Readable and unique per spec: the source's stem and a hash of every field."""
        fields = repr(dataclasses.astuple(self)).encode()
        return f"{Path(self.source).stem}-{hashlib.sha256(fields).hexdigest()[:12]}"

    def source_path(self) -> Path:
        return Path(self.source_dir or csrc_dir()) / self.source

    def program_name(self) -> str:
        """The source's absolute path: what NVRTC resolves the source's quoted includes against."""
        return str(self.source_path().resolve())

    def prelude(self) -> str:
        """The generated text put in front of the source: declarations only, between
        ``#line`` markers so NVRTC's messages name the prelude or the source file's own lines
        (absolute paths in the source's directory: quoted includes resolve there)."""
        prelude_name = str(self.source_path().resolve().parent / f"{self.name}.prelude")
        lines = [f"#line 1 {_c_string(prelude_name)}", f"// generated by pa_hybrid.runtime for {self.source}"]
        lines += [f'#include "{header}"' for header in self.includes]
        lines += [_render_constant(name, value) for name, value in self.constants]
        lines += [f"using {name} = {type_name};" for name, type_name in self.types]
        lines.append(f"#line 1 {_c_string(self.program_name())}")
        return "\n".join(lines) + "\n"


def _check_constant(item) -> None:
    if len(item) != 2 or not isinstance(item[0], str) or not _IDENTIFIER.fullmatch(item[0]):
        raise ValueError(f"KernelSpec.constants: expected (identifier, value) pairs, got {item!r}")
    value = item[1]
    if not isinstance(value, (bool, int, float)):
        raise TypeError(f"KernelSpec.constants[{item[0]!r}]: expected bool, int or float, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"KernelSpec.constants[{item[0]!r}]: expected a finite float, got {value!r}")


def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _render_constant(name: str, value) -> str:
    if isinstance(value, bool):
        return f"constexpr bool {name} = {'true' if value else 'false'};"
    if isinstance(value, int):
        return f"constexpr int {name} = {value};" if -(2**31) <= value < 2**31 else f"constexpr long long {name} = {value}LL;"
    return f"constexpr float {name} = {value!r}f;"  # kernels compute in float; repr round-trips


@dataclass(frozen=True, eq=False)
class CompiledKernel:
    """A compiled variant: the cubin, its exported symbols and what each kernel uses."""

    spec: KernelSpec
    cubin: bytes
    symbols: dict[str, str]  # entry name expression -> lowered (mangled) name in the cubin
    usage: dict[str, ResourceUsage]  # lowered name -> ptxas' report
    log: str  # NVRTC's log of the compile that made the cubin (warnings, ptxas -v)
    path: Path  # the cubin on disk
    from_cache: bool  # True when this process did not compile it

    def symbol(self, entry: str | None = None) -> str:
        """The lowered name of ``entry`` (may be omitted when the spec has one entry)."""
        if entry is None:
            if len(self.symbols) != 1:
                raise ValueError(f"entry: {self.spec.source} exports {len(self.symbols)} entries, name one of {list(self.symbols)}")
            return next(iter(self.symbols.values()))
        if entry not in self.symbols:
            raise ValueError(f"entry: {entry!r} is not among the spec's entries {list(self.symbols)}")
        return self.symbols[entry]


@functools.cache
def nvrtc_version() -> tuple[int, int]:
    from cuda.bindings import nvrtc

    result, major, minor = nvrtc.nvrtcVersion()
    _check_nvrtc(result, "nvrtcVersion")
    return major, minor


def _check_nvrtc(result, what: str) -> None:
    from cuda.bindings import nvrtc

    if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"{what} failed: {result.name}")


@dataclass(frozen=True)
class _Build:
    """What one compile of a spec takes and where its output goes."""

    text: str
    options: tuple[str, ...]
    sources: dict[str, str]  # path -> sha256 of every file the source includes, itself too
    cubin_path: Path
    meta_path: Path


def _plan(spec: KernelSpec) -> _Build:
    source = spec.source_path()
    if not source.is_file():
        raise FileNotFoundError(f"KernelSpec.source: {source} does not exist")
    cuda_include = cuda_include_dir()
    runtime_dirs = [Path(spec.source_dir or csrc_dir()).resolve()] + ([cuda_include] if cuda_include else [])
    options = (f"--gpu-architecture={spec.arch}", *RUNTIME_OPTIONS, *(f"-I{d}" for d in runtime_dirs), *spec.options)
    include_dirs = runtime_dirs + [Path(o[2:]) for o in spec.options if o.startswith("-I")]
    sources = _dependency_digests(source, spec.includes, include_dirs)
    prelude = spec.prelude()
    key = {
        "format": CACHE_FORMAT,
        "nvrtc": nvrtc_version(),
        "entries": spec.entries,
        "options": options,
        "prelude": prelude,
        "sources": sources,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    stem = kernel_cache_dir(spec.arch) / f"{spec.name}-{digest}"
    return _Build(prelude + source.read_text(), options, sources, stem.with_suffix(".cubin"), stem.with_suffix(".json"))


def _dependency_digests(source: Path, prelude_includes: tuple[str, ...], include_dirs: list[Path]) -> dict[str, str]:
    """sha256 of the source and of every header it reaches through #include, found the way
    NVRTC finds them (the including file's directory, then the include dirs). Conditional
    includes count whether taken or not, which can only cause extra rebuilds; headers
    found nowhere are NVRTC's built-ins or fail the compile anyway."""

    def resolve(name: str, including_dir: Path | None) -> Path | None:
        for d in ([including_dir] if including_dir else []) + include_dirs:
            if (d / name).is_file():
                return (d / name).resolve()
        return None

    # the prelude's #line puts it, and the program, in the source's directory
    main = source.resolve()
    digests: dict[str, str] = {}
    pending = [main] + [p for p in (resolve(h, main.parent) for h in prelude_includes) if p]
    while pending:
        path = pending.pop()
        if str(path) in digests:
            continue
        data = path.read_bytes()
        digests[str(path)] = hashlib.sha256(data).hexdigest()
        pending += [p for p in (resolve(m.decode(), path.parent) for m in _INCLUDE.findall(data)) if p]
    return digests


_compiled: dict[str, CompiledKernel] = {}  # by spec.name
_spec_locks: dict[str, threading.Lock] = {}  # one per spec: threads build different specs at once
_registry_lock = threading.Lock()


def compile_kernel(spec: KernelSpec) -> CompiledKernel:
    """The compiled variant: from this process's memory, the disk cache, or NVRTC.
    Raises CompileError with NVRTC's log when the source does not compile. Thread-safe;
    NVRTC runs without the GIL, so a thread pool compiles several specs in parallel."""
    key = spec.name
    kernel = _compiled.get(key)
    if kernel is None:
        with _registry_lock:
            lock = _spec_locks.setdefault(key, threading.Lock())
        with lock:
            kernel = _compiled.get(key)
            if kernel is None:
                kernel = _compiled[key] = _load_or_build(spec)
    return kernel


def clear_memory_cache() -> None:
    """Forget what this process compiled or read (the disk cache stays): the next
    compile_kernel re-reads sources, so edited headers are seen."""
    with _registry_lock:
        _compiled.clear()


def _load_or_build(spec: KernelSpec) -> CompiledKernel:
    from filelock import FileLock

    build = _plan(spec)
    kernel = _read_cached(spec, build)
    if kernel is not None:
        return kernel
    try:
        build.cubin_path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(f"{build.cubin_path}.lock")
        lock.acquire()
    except OSError as error:
        _warn_unwritable(build.cubin_path.parent, error)
        return _build(spec, build, store=False)
    try:
        kernel = _read_cached(spec, build)  # another process may have built it while we waited
        return kernel if kernel is not None else _build(spec, build, store=True)
    finally:
        lock.release()


def _build(spec: KernelSpec, build: _Build, store: bool) -> CompiledKernel:
    """Run NVRTC; with ``store``, also write the cache entry (the caller holds its lock)."""
    cubin, symbols, log = _nvrtc_compile(spec, build.text, build.options)
    usage = _usage_of(cubin, symbols, log)
    if store:
        meta = {
            "format": CACHE_FORMAT,
            "spec": repr(spec),
            "nvrtc": nvrtc_version(),
            "options": build.options,
            "sources": build.sources,
            "cubin_sha256": hashlib.sha256(cubin).hexdigest(),
            "symbols": symbols,
            "usage": {name: u.to_json() for name, u in usage.items()},
            "log": log,
        }
        try:
            write_atomic(build.cubin_path, cubin)
            write_atomic(build.meta_path, json.dumps(meta, indent=1).encode())
        except OSError as error:
            _warn_unwritable(build.cubin_path.parent, error)
    return CompiledKernel(spec, cubin, symbols, usage, log, build.cubin_path, from_cache=False)


_warned_unwritable: set[str] = set()


def _warn_unwritable(directory: Path, error: OSError) -> None:
    """Once per directory: the disk cache is skipped, builds stay in this process's memory."""
    if str(directory) not in _warned_unwritable:
        _warned_unwritable.add(str(directory))
        warnings.warn(
            f"pa_hybrid: the kernel cache {directory} cannot be written ({error}); compiling into memory only "
            f"(set {CACHE_DIR_ENV} to a writable directory to keep builds across processes)",
            RuntimeWarning,
            stacklevel=4,
        )


def _usage_of(cubin: bytes, symbols: dict[str, str], log: str) -> dict[str, ResourceUsage]:
    """ptxas' report from the log (with spill counts); kernels it leaves out are read from
    the cubin with cuobjdump when it is found (without spill counts)."""
    usage = parse_ptxas_report(log)
    if not usage.keys() >= set(symbols.values()) and find_tool("cuobjdump"):
        usage = resource_usage(cubin) | usage
    return usage


def _read_cached(spec: KernelSpec, build: _Build) -> CompiledKernel | None:
    try:
        meta = json.loads(build.meta_path.read_bytes())
        cubin = build.cubin_path.read_bytes()
    except (OSError, ValueError):
        return None
    try:
        if meta.get("format") != CACHE_FORMAT or meta.get("cubin_sha256") != hashlib.sha256(cubin).hexdigest():
            return None  # a foreign or damaged entry: rebuilt and replaced
        usage = {name: ResourceUsage.from_json(u) for name, u in meta["usage"].items()}
        symbols, log = dict(meta["symbols"]), str(meta["log"])
    except (AttributeError, KeyError, TypeError, ValueError):
        return None  # JSON of another shape (hand-edited, or fields changed without a format bump)
    return CompiledKernel(spec, cubin, symbols, usage, log, build.cubin_path, from_cache=True)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` so that readers see the old file or the whole new one, never a part:
    a temporary file in the same directory (same file system), flushed, then renamed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes 0600; cache entries are plain readable files
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _nvrtc_compile(spec: KernelSpec, text: str, options: tuple[str, ...]) -> tuple[bytes, dict[str, str], str]:
    """One NVRTC run: (cubin, entry -> lowered name, log)."""
    from cuda.bindings import nvrtc

    result, program = nvrtc.nvrtcCreateProgram(text.encode(), spec.program_name().encode(), 0, [], [])
    _check_nvrtc(result, "nvrtcCreateProgram")
    try:
        for entry in spec.entries:
            _check_nvrtc(nvrtc.nvrtcAddNameExpression(program, entry.encode())[0], f"nvrtcAddNameExpression({entry!r})")
        encoded = [o.encode() for o in options]
        (result,) = nvrtc.nvrtcCompileProgram(program, len(encoded), encoded)
        log = _program_log(program)
        if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            hint = "" if cuda_include_dir() else (
                "note: no CUDA include directory with cuda_fp16.h was found: "
                "pip install nvidia-cuda-runtime, or set CUDA_HOME to a CUDA toolkit"
            )
            raise CompileError(spec, options, log, result.name, hint)
        symbols = {}
        for entry in spec.entries:
            result, lowered = nvrtc.nvrtcGetLoweredName(program, entry.encode())
            _check_nvrtc(result, f"nvrtcGetLoweredName({entry!r})")
            symbols[entry] = lowered.decode()
        result, size = nvrtc.nvrtcGetCUBINSize(program)
        _check_nvrtc(result, "nvrtcGetCUBINSize")
        cubin = bytearray(size)  # filled by NVRTC; never a bytes object, which may be shared
        _check_nvrtc(nvrtc.nvrtcGetCUBIN(program, cubin)[0], "nvrtcGetCUBIN")
        return bytes(cubin), symbols, log
    finally:
        nvrtc.nvrtcDestroyProgram(program)


def _program_log(program) -> str:
    from cuda.bindings import nvrtc

    result, size = nvrtc.nvrtcGetProgramLogSize(program)
    _check_nvrtc(result, "nvrtcGetProgramLogSize")
    # A mutable buffer: filling b" " * size would, for size 1 (an empty log), overwrite
    # the interpreter's shared b" " object.
    log = bytearray(size)
    _check_nvrtc(nvrtc.nvrtcGetProgramLog(program, log)[0], "nvrtcGetProgramLog")
    return log.rstrip(b"\0").decode(errors="replace")


@dataclass(frozen=True)
class WarmupResult:
    """The outcome of compiling one spec ahead of time."""

    spec: KernelSpec
    seconds: float
    kernel: CompiledKernel | None = None
    error: Exception | None = None


def warmup(specs: Iterable[KernelSpec], on_result: Callable[[WarmupResult], None] | None = None) -> list[WarmupResult]:
    """Compile every spec into the disk cache. A spec that fails is reported in its
    result (``error``) rather than raised, so one bad variant does not hide the others;
    ``on_result`` sees each result as soon as it is known."""
    results = []
    for spec in specs:
        start = time.perf_counter()
        kernel = error = None
        try:
            kernel = compile_kernel(spec)
        except (CompileError, OSError) as failure:
            error = failure
        result = WarmupResult(spec, time.perf_counter() - start, kernel, error)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results
