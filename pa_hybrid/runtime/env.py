"""Every path and environment knob of the runtime, read when asked (never at import).

``PA_HYBRID_CACHE_DIR``  where compiled kernels are cached (default ``~/.cache/pa_hybrid``).
``CUDA_HOME``/``CUDA_PATH``  a CUDA toolkit to take headers and tools from when no
wheel provides them (``/usr/local/cuda`` is tried last).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

CACHE_DIR_ENV = "PA_HYBRID_CACHE_DIR"
CUDA_HEADER = "cuda_fp16.h"  # the header NVRTC lacks that every csrc kernel needs


def cache_dir() -> Path:
    """The root of the on-disk kernel cache."""
    override = os.environ.get(CACHE_DIR_ENV)
    return Path(override).expanduser() if override else Path.home() / ".cache" / "pa_hybrid"


def kernel_cache_dir(arch: str) -> Path:
    """Where NVRTC output for one architecture lives (arch in the path, so builds for
    different GPUs never share a file name)."""
    return cache_dir() / "nvrtc" / arch


def _package_data_dir(name: str) -> Path:
    # Installed: shipped inside the package as pa_hybrid.<name> (pyproject maps the
    # top-level folder there). A plain source checkout: the folder at the repository top.
    spec = importlib.util.find_spec(f"pa_hybrid.{name}")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parents[2] / name


def csrc_dir() -> Path:
    """The portable C++ kernel sources (``csrc/``)."""
    return _package_data_dir("csrc")


def asm_dir() -> Path:
    """The prebuilt PTX kernels and their manifest (``asm/``)."""
    return _package_data_dir("asm")


def _cuda_roots() -> list[Path]:
    roots = [os.environ.get(var) for var in ("CUDA_HOME", "CUDA_PATH")]
    return [Path(r) for r in roots if r] + [Path("/usr/local/cuda")]


def cuda_include_dir() -> Path | None:
    """The directory with ``cuda_fp16.h``/``cuda_bf16.h``, which NVRTC does not carry.

    cuda.pathfinder (a dependency of cuda-bindings) looks in the nvidia-cuda-runtime
    wheel, a conda environment, CUDA_HOME/CUDA_PATH and the system, in that order;
    without it, the toolkit roots are tried directly."""
    try:
        from cuda.pathfinder import find_nvidia_header_directory
    except ImportError:
        candidates = [root / "include" for root in _cuda_roots()]
    else:
        found = find_nvidia_header_directory("cudart")
        candidates = [Path(found)] if found else []
    return next((d for d in candidates if (d / CUDA_HEADER).is_file()), None)


def find_tool(name: str) -> str | None:
    """A CUDA binary utility (``cuobjdump``, ``ptxas``, ``nvdisasm``): on PATH, in a CUDA
    toolkit, or the copy Triton bundles for its NVIDIA backend (found without importing
    Triton)."""
    found = shutil.which(name)
    if found:
        return found
    dirs = [root / "bin" for root in _cuda_roots()]
    triton = importlib.util.find_spec("triton")
    if triton is not None and triton.submodule_search_locations:
        dirs.append(Path(next(iter(triton.submodule_search_locations))) / "backends" / "nvidia" / "bin")
    return next((str(d / name) for d in dirs if os.access(d / name, os.X_OK)), None)
