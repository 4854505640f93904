"""The ROCm half of the runtime: compile ``csrc/`` variants with hipRTC, load code objects
and launch them through HIP's module API, with hip-python (imported at first use).

Same interface as the CUDA half (``driver.py`` and ``compiler.py``): ``arch_of``,
``get_function``, ``load_function``, ``launch``, ``launch_packed``; ``__init__.py`` picks
this one on a ROCm build of torch. Differences: compiled variants are cached in memory
only (no disk cache), and no resource usage is read back (the CI compile with clang,
``amdgcn.py``, checks registers and spills instead).

Never run: no AMD GPU was available to this project. What is tested without one
(tests/test_hip_rocm_compile.py): the hipRTC options, and that the launch buffer is built
as HIP's "extra" protocol expects.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import threading
from pathlib import Path

import torch

from .compiler import KernelSpec
from .driver import dim3, kernel_arg  # argument checks shared with the CUDA half (no cuda-python needed)
from .env import csrc_dir

PIP_HINT = "pip install hip-python (the version of the installed ROCm)"
# hip_runtime_api.h: HIP_LAUNCH_PARAM_BUFFER_POINTER / _SIZE / _END
LAUNCH_PARAM_BUFFER_POINTER, LAUNCH_PARAM_BUFFER_SIZE, LAUNCH_PARAM_END = 1, 2, 3


class DriverError(RuntimeError):
    """A HIP or hipRTC call failed; the message names the call and the error."""


def _check(result, what: str):
    result = result if isinstance(result, tuple) else (result,)
    error = result[0]
    if int(error) != 0:  # hipSuccess / HIPRTC_SUCCESS
        raise DriverError(f"{what} failed: {getattr(error, 'name', error)}")
    return None if len(result) == 1 else result[1] if len(result) == 2 else result[1:]


@functools.cache
def _bindings():
    from hip import hip, hiprtc

    return hip, hiprtc


def unavailable_reason() -> str | None:
    try:
        _bindings()
    except ImportError as error:
        return f"hip-python is not installed ({error}): {PIP_HINT}"
    return None


@functools.cache
def arch_of(device_index: int) -> str:
    """The device's offload target without feature flags: gfx942 for "gfx942:sramecc+:xnack-"."""
    return torch.cuda.get_device_properties(device_index).gcnArchName.split(":")[0]


def hiprtc_options(spec: KernelSpec) -> list[str]:
    """hipRTC options of a variant: the spec's arch as the offload target, the csrc/ include
    directory and the spec's own options."""
    include = Path(spec.source_dir or csrc_dir()).resolve()
    return [f"--offload-arch={spec.arch}", "-std=c++17", "-O3", f"-I{include}", *spec.options]


def _compile(spec: KernelSpec) -> tuple[bytes, dict[str, str]]:
    """(code object, {entry: lowered symbol}) of a variant."""
    _, rtc = _bindings()
    text = (spec.prelude() + spec.source_path().read_text()).encode()
    program = _check(rtc.hiprtcCreateProgram(text, spec.program_name().encode(), 0, [], []), "hiprtcCreateProgram")
    try:
        for entry in spec.entries:
            _check(rtc.hiprtcAddNameExpression(program, entry.encode()), f"hiprtcAddNameExpression({entry!r})")
        options = [o.encode() for o in hiprtc_options(spec)]
        error = rtc.hiprtcCompileProgram(program, len(options), options)[0]
        if int(error) != 0:
            log_size = _check(rtc.hiprtcGetProgramLogSize(program), "hiprtcGetProgramLogSize")
            log = bytearray(log_size)
            _check(rtc.hiprtcGetProgramLog(program, log), "hiprtcGetProgramLog")
            raise DriverError(f"hipRTC could not compile {spec.source} for {list(spec.entries)}:\n{log.decode(errors='replace')}")
        symbols = {}
        for entry in spec.entries:
            lowered = _check(rtc.hiprtcGetLoweredName(program, entry.encode()), f"hiprtcGetLoweredName({entry!r})")
            symbols[entry] = lowered.decode() if isinstance(lowered, bytes) else str(lowered)
        size = _check(rtc.hiprtcGetCodeSize(program), "hiprtcGetCodeSize")
        code = bytearray(size)
        _check(rtc.hiprtcGetCode(program, code), "hiprtcGetCode")
        return bytes(code), symbols
    finally:
        rtc.hiprtcDestroyProgram(program)


class Function:
    """A loaded kernel: its handle and the device it runs on."""

    def __init__(self, symbol: str, device_index: int, handle):
        self.symbol, self.device_index, self.handle = symbol, device_index, handle

    def __repr__(self):
        return f"Function({self.symbol!r}, device {self.device_index})"


_lock = threading.Lock()
_compiled: dict[str, tuple[bytes, dict[str, str]]] = {}  # by spec.name (tells 2, 2.0 and True apart)
_modules: dict[tuple, object] = {}
_functions: dict[tuple, Function] = {}


def get_function(spec: KernelSpec, device_index: int, entry: str | None = None) -> Function:
    """The kernel ``entry`` of a variant (compiled with hipRTC at first use) on the device."""
    key = (spec.name, entry, device_index)
    if key not in _functions:
        with _lock:
            if spec.name not in _compiled:
                _compiled[spec.name] = _compile(spec)
        code, symbols = _compiled[spec.name]
        if entry is None and len(symbols) != 1:
            raise ValueError(f"entry: {spec.source} exports {list(symbols)}; name one")
        symbol = symbols[entry if entry is not None else next(iter(symbols))]
        _functions[key] = _load(spec, code, symbol, device_index)
    return _functions[key]


def load_function(code: bytes | str | os.PathLike, symbol: str, device_index: int) -> Function:
    """The kernel ``symbol`` of a code object (an hsaco, e.g. aiter's ``.co`` files) given as
    bytes or a path."""
    code_key = hashlib.sha256(code).hexdigest() if isinstance(code, bytes) else os.fspath(code)
    key = (code_key, symbol, device_index)
    if key not in _functions:
        image = code if isinstance(code, bytes) else Path(code).read_bytes()
        _functions[key] = _load(code_key, image, symbol, device_index)
    return _functions[key]


def _load(code_key, image: bytes, symbol: str, device_index: int) -> Function:
    hip, _ = _bindings()
    with _lock, torch.cuda.device(device_index):  # modules load into the current device's context
        module = _modules.get((code_key, device_index))
        if module is None:
            module = _check(hip.hipModuleLoadData(image), "hipModuleLoadData")
            _modules[(code_key, device_index)] = module
        handle = _check(hip.hipModuleGetFunction(module, symbol.encode()), f"hipModuleGetFunction({symbol!r})")
    return Function(symbol, device_index, handle)


def launch(function: Function, grid, block, shared_bytes: int = 0, args=(), *, stream=None) -> None:
    """Launch with parameters given one by one: ctypes values (a ``Structure`` passes a
    by-value struct) and tensors (their data pointer), as the CUDA half takes them."""
    values = [kernel_arg(a, i) for i, a in enumerate(args)]
    pointers = (ctypes.c_void_p * len(values))(*map(ctypes.addressof, values))
    _launch(function, grid, block, shared_bytes, stream, ctypes.addressof(pointers), None)


def extra_buffer(packed: ctypes.Structure) -> tuple[ctypes.Array, ctypes.c_size_t]:
    """HIP's "extra" launch array for a packed argument block: (POINTER, &block, SIZE, &size,
    END). The size must stay alive with the array, so both are returned."""
    size = ctypes.c_size_t(ctypes.sizeof(packed))
    extra = (ctypes.c_void_p * 5)(
        LAUNCH_PARAM_BUFFER_POINTER, ctypes.addressof(packed), LAUNCH_PARAM_BUFFER_SIZE, ctypes.addressof(size), LAUNCH_PARAM_END
    )
    return extra, size


def launch_packed(function: Function, grid, block, shared_bytes: int, packed: ctypes.Structure, *, stream=None) -> None:
    """Launch with all parameters in one buffer laid out as the kernel's argument segment."""
    if not isinstance(packed, ctypes.Structure):
        raise TypeError(f"packed: expected a ctypes.Structure instance, got {type(packed).__name__}")
    extra, _size = extra_buffer(packed)
    _launch(function, grid, block, shared_bytes, stream, None, ctypes.addressof(extra))


def _launch(function: Function, grid, block, shared_bytes: int, stream, params, extra) -> None:
    hip, _ = _bindings()
    if stream is None:
        stream = torch.cuda.current_stream(function.device_index).cuda_stream
    elif not isinstance(stream, int):
        stream = stream.cuda_stream
    _check(
        hip.hipModuleLaunchKernel(
            function.handle, *dim3(grid, "grid"), *dim3(block, "block"), shared_bytes, stream, params, extra
        ),
        f"hipModuleLaunchKernel({function.symbol}, grid={grid}, block={block})",
    )
