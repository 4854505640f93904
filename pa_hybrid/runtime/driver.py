"""Load code objects and launch kernels through the CUDA driver API, on torch's streams.

A code object (an NVRTC cubin, or PTX that the driver assembles for the device) is
loaded once per (code object, device) per process, into the device's primary context:
the context torch's runtime uses, in which tensor pointers and torch's streams are
valid (``cuCtxCreate`` would make a second context, in which they are not).

Launches go on torch's current stream of the function's device unless a stream is
given, never synchronize, and are captured by a CUDA graph like any kernel launched on
the capturing stream. Load (compile) a function before capturing: loading a module is
not a stream operation.

The launch path costs a few microseconds of Python: the function handle, its context
and its shared-memory limit are kept on the :class:`Function`; a launch packs the
argument pointers into one ctypes array and makes two driver calls (cuCtxGetCurrent,
cuLaunchKernel), plus a push and a pop when the calling thread has another context
current, or none (a thread torch never used).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import threading
from pathlib import Path

import torch

from .compiler import KernelSpec, compile_kernel
from .usage import ELF_MAGIC, ResourceUsage

JIT_LOG_BYTES = 16384  # room for the driver's PTX assembler errors
_CTYPES_VALUES = (ctypes._SimpleCData, ctypes.Structure, ctypes.Union, ctypes.Array)


class DriverError(RuntimeError):
    """A CUDA driver call failed; the message names the call and the CUDA error."""


def _check(result: tuple, what: str):
    """The value of a ``(CUresult, value...)`` tuple from the bindings, or DriverError."""
    error = result[0]
    if error:  # CUresult is an int enum; CUDA_SUCCESS is 0
        raise DriverError(f"{what} failed: {error.name}")
    return result[1] if len(result) == 2 else result[1:]


@functools.cache
def _cuda():
    """The initialized driver bindings (imported here: ``import pa_hybrid`` needs no cuda-python)."""
    from cuda.bindings import driver

    _check(driver.cuInit(0), "cuInit")
    return driver


@functools.cache
def arch_of(device_index: int) -> str:
    """The exact architecture to compile for: "sm_90a" on H100/H200 (the arch-specific
    Hopper target, which wgmma and setmaxnreg need), "sm_XY" elsewhere."""
    major, minor = torch.cuda.get_device_capability(device_index)
    return "sm_90a" if (major, minor) == (9, 0) else f"sm_{major}{minor}"


@functools.cache
def primary_context(device_index: int):
    """The device's primary context, retained for the life of the process (torch holds it too)."""
    drv = _cuda()
    device = _check(drv.cuDeviceGet(device_index), f"cuDeviceGet({device_index})")
    return _check(drv.cuDevicePrimaryCtxRetain(device), f"cuDevicePrimaryCtxRetain({device_index})")


def _make_current(context, context_id: int) -> bool:
    """Make ``context`` current on this thread if it is not already (torch has normally
    made its device's primary context current); True if it was pushed and must be popped."""
    drv = _cuda()
    if int(_check(drv.cuCtxGetCurrent(), "cuCtxGetCurrent")) == context_id:
        return False
    _check(drv.cuCtxPushCurrent(context), "cuCtxPushCurrent")
    return True


def _restore_current(pushed: bool) -> None:
    if pushed:
        _check(_cuda().cuCtxPopCurrent(), "cuCtxPopCurrent")


class Function:
    """One kernel loaded into one device's primary context, ready to launch.

    ``usage`` is what the driver reports for it (registers, per-thread local memory,
    static shared memory, max threads per CTA)."""

    __slots__ = ("symbol", "device_index", "handle", "usage", "context", "_context_id", "_dynamic_shared_limit")

    def __init__(self, symbol: str, device_index: int, handle, context):
        drv = _cuda()
        attribute = drv.CUfunction_attribute

        def get(which):
            return _check(drv.cuFuncGetAttribute(which, handle), f"cuFuncGetAttribute({which.name}, {symbol})")

        self.symbol, self.device_index, self.handle = symbol, device_index, handle
        self.usage = ResourceUsage(
            registers=get(attribute.CU_FUNC_ATTRIBUTE_NUM_REGS),
            stack_bytes=get(attribute.CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES),
            shared_bytes=get(attribute.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES),
            max_threads=get(attribute.CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK),
        )
        self._dynamic_shared_limit = get(attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)
        self.context, self._context_id = context, int(context)

    def __repr__(self):
        return f"Function({self.symbol!r}, cuda:{self.device_index}, {self.usage})"

    def _allow_dynamic_shared(self, shared_bytes: int) -> None:
        # Above 48 KB a kernel must opt in, once per function (the attribute sticks).
        drv = _cuda()
        which = drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        (error,) = drv.cuFuncSetAttribute(self.handle, which, shared_bytes)
        if error:
            optin = drv.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
            device = _check(drv.cuDeviceGet(self.device_index), "cuDeviceGet")
            limit = _check(drv.cuDeviceGetAttribute(optin, device), "cuDeviceGetAttribute")
            raise ValueError(
                f"shared_bytes: {self.symbol} cannot get {shared_bytes} bytes of dynamic shared memory on "
                f"cuda:{self.device_index} (at most {limit} per CTA, {self.usage.shared_bytes} of them static; "
                f"{error.name})"
            )
        self._dynamic_shared_limit = shared_bytes


_modules: dict[tuple, object] = {}  # (code key, device index) -> CUmodule
_functions: dict[tuple, Function] = {}  # (code key, symbol or entry, device index) -> Function
_load_lock = threading.Lock()


def get_function(spec: KernelSpec, device_index: int, entry: str | None = None) -> Function:
    """The kernel ``entry`` (a name expression of the spec; may be omitted when it has one)
    of a compiled variant, loaded on ``cuda:device_index``. Compiles on first use. Loaded
    code is keyed by the cubin's file, whose name holds the digest of the sources: after
    ``compiler.clear_memory_cache()`` an edited source is loaded anew, not the old module."""
    kernel = compile_kernel(spec)
    symbol = kernel.symbol(entry)
    key = (str(kernel.path), symbol, device_index)
    function = _functions.get(key)
    if function is None:
        function = _functions[key] = _load(str(kernel.path), kernel.cubin, symbol, device_index)
    return function


def load_function(code: bytes | str | os.PathLike, symbol: str, device_index: int) -> Function:
    """The kernel ``symbol`` of a code object given as bytes or a file path: a cubin, or
    PTX that the driver assembles for the device (errors include the assembler's log).
    A path is read once; bytes are recognized by their hash."""
    code_key = hashlib.sha256(code).hexdigest() if isinstance(code, bytes) else os.fspath(code)
    key = (code_key, symbol, device_index)
    function = _functions.get(key)
    if function is None:
        image = code if isinstance(code, bytes) else Path(code).read_bytes()
        function = _load(code_key, image, symbol, device_index)
        _functions[key] = function
    return function


def _load(code_key, image: bytes, symbol: str, device_index: int) -> Function:
    drv = _cuda()
    context = primary_context(device_index)
    with _load_lock:
        pushed = _make_current(context, int(context))
        try:
            module = _modules.get((code_key, device_index))
            if module is None:
                module = _load_module(image)
                _modules[(code_key, device_index)] = module
            handle = _check(drv.cuModuleGetFunction(module, symbol.encode()), f"cuModuleGetFunction({symbol!r})")
            return Function(symbol, device_index, handle, context)
        finally:
            _restore_current(pushed)


def _load_module(image: bytes):
    drv = _cuda()
    if not image.startswith(ELF_MAGIC) and not image.endswith(b"\0"):
        image += b"\0"  # the driver reads PTX as a C string
    log = bytearray(JIT_LOG_BYTES)  # filled by the driver
    options = [drv.CUjit_option.CU_JIT_ERROR_LOG_BUFFER, drv.CUjit_option.CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES]
    error, module = drv.cuModuleLoadDataEx(image, len(options), options, [log, JIT_LOG_BYTES])
    if error:
        details = log.rstrip(b"\0").decode(errors="replace").strip()
        raise DriverError(f"cuModuleLoadDataEx failed: {error.name}" + (f"\n{details}" if details else ""))
    return module


def dim3(value, name: str) -> tuple[int, int, int]:
    if isinstance(value, int):
        return value, 1, 1
    if not 1 <= len(value) <= 3:
        raise ValueError(f"{name}: expected an int or 1 to 3 ints, got {value!r}")
    return (*value, 1, 1)[:3]


def kernel_arg(value, index: int):
    if isinstance(value, torch.Tensor):
        if not value.is_cuda:
            raise ValueError(f"args[{index}]: a {value.device} tensor cannot be passed to a GPU kernel")
        return ctypes.c_void_p(value.data_ptr())
    if isinstance(value, _CTYPES_VALUES):
        return value
    raise TypeError(
        f"args[{index}]: expected a CUDA tensor or a ctypes value (c_int32, c_int64, c_float, c_void_p, "
        f"a Structure passed by value), got {type(value).__name__}; Python numbers have no C type"
    )


def launch(function: Function, grid, block, shared_bytes: int = 0, args=(), *, stream=None) -> None:
    """Launch ``function`` with its parameters given one by one.

    ``args``: CUDA tensors (passed as their data pointer) and ctypes values, e.g.
    ``ctypes.c_int32(n)``, ``ctypes.c_float(x)``, ``ctypes.c_void_p(ptr)`` or a
    ``ctypes.Structure`` for a by-value struct parameter (laid out like the C struct).
    ``grid``/``block``: an int or up to three ints. ``shared_bytes``: dynamic shared
    memory per CTA (above 48 KB the function is opted in on first use). ``stream``:
    None for torch's current stream of the function's device, a ``torch.cuda.Stream``,
    or a raw ``CUstream`` handle as an int."""
    values = [kernel_arg(a, i) for i, a in enumerate(args)]
    pointers = (ctypes.c_void_p * len(values))(*map(ctypes.addressof, values))
    _launch(function, grid, block, shared_bytes, stream, ctypes.addressof(pointers), 0)


def launch_packed(function: Function, grid, block, shared_bytes: int, packed: ctypes.Structure, *, stream=None) -> None:
    """Launch ``function`` with all its parameters in one buffer: ``packed`` is a
    ``ctypes.Structure`` whose fields sit at the offsets of the kernel's parameters
    (what the asm backend's PTX kernels take). Passed with the driver's "extra"
    mechanism (CU_LAUNCH_PARAM_BUFFER_POINTER / _SIZE / _END); the other arguments are
    those of :func:`launch`."""
    if not isinstance(packed, ctypes.Structure):
        raise TypeError(f"packed: expected a ctypes.Structure instance, got {type(packed).__name__}")
    drv = _cuda()
    size = ctypes.c_size_t(ctypes.sizeof(packed))
    extra = (ctypes.c_void_p * 5)(
        drv.CU_LAUNCH_PARAM_BUFFER_POINTER,
        ctypes.addressof(packed),
        drv.CU_LAUNCH_PARAM_BUFFER_SIZE,
        ctypes.addressof(size),
        drv.CU_LAUNCH_PARAM_END,
    )
    _launch(function, grid, block, shared_bytes, stream, 0, ctypes.addressof(extra))


def _launch(function: Function, grid, block, shared_bytes: int, stream, params: int, extra: int) -> None:
    gx, gy, gz = dim3(grid, "grid")
    bx, by, bz = dim3(block, "block")
    if stream is None:
        # torch's current stream, as Inductor's generated code reads it: 0.1 us against
        # 1.9 us for torch.cuda.current_stream(i).cuda_stream (H100 host, measured)
        stream = torch._C._cuda_getCurrentRawStream(function.device_index)
    elif not isinstance(stream, int):
        stream = stream.cuda_stream
    pushed = _make_current(function.context, function._context_id)
    try:
        if shared_bytes > function._dynamic_shared_limit:
            function._allow_dynamic_shared(shared_bytes)
        (error,) = _cuda().cuLaunchKernel(function.handle, gx, gy, gz, bx, by, bz, shared_bytes, stream, params, extra)
    finally:
        _restore_current(pushed)
    if error:
        raise DriverError(
            f"cuLaunchKernel({function.symbol}, grid={grid}, block={block}, shared_bytes={shared_bytes}) failed: {error.name}"
        )
