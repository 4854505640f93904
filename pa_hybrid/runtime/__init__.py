"""pa_hybrid.runtime: the one place that touches the GPU driver.

Compile a ``csrc/`` kernel variant with NVRTC at first use (cached in memory and on
disk), load it or a PTX/cubin code object into the device's primary context, and
launch it on torch's current stream::

    spec = KernelSpec("paged_decode_split_kv.cu", ("pa::paged_decode_split_kv<true, 0, 128, 16, false, 0>",), arch_of(0))
    function = get_function(spec, device_index=0)
    launch(function, grid, block, shared_bytes, [params])      # by-value struct / one-by-one args
    launch_packed(load_function(ptx_path, symbol, 0), grid, block, shared_bytes, packed_struct)

Nothing here imports cuda-python until it is used, so ``import pa_hybrid`` works
without it; :func:`unavailable_reason` says whether the runtime can work here.
``python -m pa_hybrid.runtime info`` / ``warmup`` (see ``__main__.py``).

ROCm: on a ROCm build of torch the same names come from ``rocm.py`` (hipRTC and HIP's
module API through hip-python): never run on an AMD GPU, see README "Platforms".
"""

from __future__ import annotations

import functools

import torch

from .compiler import CompileError, CompiledKernel, KernelSpec, WarmupResult, compile_kernel, warmup
from .env import cache_dir
from .usage import ResourceUsage, resource_usage

if torch.version.hip:
    from .rocm import DriverError, Function, arch_of, get_function, launch, launch_packed, load_function
else:
    from .driver import DriverError, Function, arch_of, get_function, launch, launch_packed, load_function

__all__ = [
    "CompileError",
    "CompiledKernel",
    "DriverError",
    "Function",
    "KernelSpec",
    "ResourceUsage",
    "WarmupResult",
    "arch_of",
    "cache_dir",
    "compile_kernel",
    "driver_unavailable_reason",
    "get_function",
    "launch",
    "launch_packed",
    "load_function",
    "resource_usage",
    "unavailable_reason",
    "warmup",
]

PIP_HINT = "pip install 'cuda-bindings>=13,<14' 'nvidia-cuda-nvrtc>=13,<14'"


@functools.cache
def driver_unavailable_reason() -> str | None:
    """None when code objects (PTX, cubins) can be loaded and launched in this process,
    else why not: the platform and cuda-python's driver bindings; not whether a GPU is
    present (backends check that)."""
    if torch.version.hip:
        from .rocm import unavailable_reason as rocm_unavailable_reason

        return rocm_unavailable_reason()
    try:
        from cuda.bindings import driver  # noqa: F401
    except ImportError as error:
        return f"cuda-python is not installed ({error}): {PIP_HINT}"
    return None


@functools.cache
def unavailable_reason() -> str | None:
    """None when kernels can be compiled and loaded in this process, else why not.

    Checks what :func:`driver_unavailable_reason` checks, that NVRTC loads and that the
    CUDA headers the kernels include are found."""
    from .compiler import nvrtc_version
    from .env import cuda_include_dir

    reason = driver_unavailable_reason()
    if reason is not None or torch.version.hip:  # hip-python brings hipRTC
        return reason
    try:
        from cuda.bindings import nvrtc  # noqa: F401
    except ImportError as error:
        return f"cuda-python is not installed ({error}): {PIP_HINT}"
    try:
        nvrtc_version()
    except Exception as error:  # the bindings raise their library loader's own error types
        return f"NVRTC could not be loaded ({type(error).__name__}: {error}): {PIP_HINT}"
    if cuda_include_dir() is None:
        return "CUDA headers (cuda_fp16.h) not found: pip install nvidia-cuda-runtime, or set CUDA_HOME"
    return None
