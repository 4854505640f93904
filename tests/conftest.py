"""Test setup: without a GPU every Triton kernel runs under Triton's CPU
interpreter (TRITON_INTERPRET=1, set before triton is imported); with one, the
same tests run on ``cuda`` with the kernels compiled for it: an NVIDIA GPU, or an
AMD one under a ROCm build of torch (``torch.version.hip`` set, device still ``cuda``).

Tests that need something only NVIDIA's stack has (PTX, NVRTC cubins, the CUDA driver
API, FlashInfer) say so with :func:`requires_nvidia`; a forced backend that cannot run
a call is skipped with the backend's own reason (:func:`skip_if_unsupported`).
"""

import importlib.util
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROCM = torch.version.hip is not None
"""A ROCm build of torch: ``cuda`` devices are AMD GPUs, driven through HIP."""
PLATFORM = f"ROCm (torch.version.hip {torch.version.hip})" if ROCM else (
    f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
)
"""What this torch was built for, as the report header and skip reasons name it."""


if DEVICE == "cpu":  # the asm backend's PTX runs in the emulator: every "asm" test checks it on CPU
    from ptx_emulator import EmulatedAsmBackend  # noqa: E402  (tests/ is on sys.path, as for conftest)

    from pa_hybrid import dispatch  # noqa: E402

    dispatch.register(EmulatedAsmBackend())


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_seed():
    # fresh data every run (never a fixed seed), but printed so a failure can be replayed
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"torch seed {seed}")  # shown with a failure's captured output
    yield seed


@pytest.fixture
def interpreter_bounds_check(monkeypatch):
    """Under Triton's CPU interpreter, every masked load and store of a kernel must address
    the storage of one of its tensor arguments: an access outside all of them raises
    (unchecked, the interpreter reads whatever memory is there, or dies on a null pointer).
    On a GPU compute-sanitizer's memcheck does this, and where this Triton's interpreter lacks
    the hooks (``GridExecutor.__call__``, ``create_masked_load/store``) nothing does: the test
    then runs unchecked (its own assertions still hold)."""
    if DEVICE == "cuda":
        return
    import numpy as np
    from triton.runtime import interpreter

    executor, builder = getattr(interpreter, "GridExecutor", None), getattr(interpreter, "InterpreterBuilder", None)
    if not all(hasattr(c, f) for c, f in ((executor, "__call__"), (builder, "create_masked_load"), (builder, "create_masked_store"))):
        return
    storages = []  # [start, end) byte ranges of the running kernel's tensor arguments

    def checked(ptrs, mask, what):
        addresses = ptrs.data.ravel() if mask is None else ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape).astype(bool)]
        inside = np.zeros(addresses.shape, dtype=bool)
        for start, end in storages:
            inside |= (addresses >= start) & (addresses < end)
        if not inside.all():
            raise AssertionError(f"a {what} outside every tensor argument of the kernel, e.g. at {int(addresses[~inside][0]):#x}")

    launch, load, store = executor.__call__, builder.create_masked_load, builder.create_masked_store

    def recording_launch(self, *args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        storages[:] = [(t.untyped_storage().data_ptr(), t.untyped_storage().data_ptr() + t.untyped_storage().nbytes()) for t in tensors]
        return launch(self, *args, **kwargs)

    def checked_load(self, ptrs, mask, *rest):
        checked(ptrs, mask, "load")
        return load(self, ptrs, mask, *rest)

    def checked_store(self, ptrs, value, mask, *rest):
        checked(ptrs, mask, "store")
        return store(self, ptrs, value, mask, *rest)

    monkeypatch.setattr(executor, "__call__", recording_launch)
    monkeypatch.setattr(builder, "create_masked_load", checked_load)
    monkeypatch.setattr(builder, "create_masked_store", checked_store)


def pytest_report_header(config):
    if DEVICE == "cuda":
        mode = "GPU: " + torch.cuda.get_device_name()
        if ROCM:  # the offload target, e.g. gfx942:sramecc+:xnack-
            mode += f" ({torch.cuda.get_device_properties(0).gcnArchName})"
    else:
        mode = "CPU: Triton interpreter"
    return f"pa_hybrid tests on {mode}; torch {torch.__version__} built for {PLATFORM}"


requires_gpu = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU (none found; CPU runs use the Triton interpreter)")


def requires_nvidia(what: str):
    """Skip unless the tests run on an NVIDIA GPU, for a GPU test that needs ``what``,
    something only NVIDIA's stack has (PTX, NVRTC cubins, the CUDA driver API, FlashInfer).
    Without a GPU it is :data:`requires_gpu`; on a ROCm build of torch the reason names
    ``what``. (Backends that cannot run a call are skipped by :func:`skip_if_unsupported`
    with their own reason instead.)"""
    if DEVICE != "cuda":
        return requires_gpu
    return pytest.mark.skipif(ROCM, reason=f"NVIDIA only: {what}; this torch is built for {PLATFORM}")


def requires_cuda_torch(what: str):
    """Skip on a ROCm build of torch, with or without a GPU, for a test of the CUDA half of
    the package (``runtime/driver.py``, cuda-python) that the ROCm half does differently."""
    return pytest.mark.skipif(ROCM, reason=f"CUDA build of torch only: {what}; this torch is built for {PLATFORM}")


def nvrtc_unavailable_reason() -> str | None:
    """Why NVRTC (``runtime/compiler.py``, ``runtime.compile_kernel``) cannot compile here,
    or None. On a CUDA build of torch this is ``runtime.unavailable_reason()``. On a ROCm
    build that reason is hipRTC's (``runtime/rocm.py``), so NVRTC is checked on its own:
    compiling for sm_90a needs no GPU, only cuda-python, NVRTC and the CUDA headers."""
    from pa_hybrid import runtime

    if not ROCM:
        return runtime.unavailable_reason()
    from pa_hybrid.runtime.compiler import nvrtc_version
    from pa_hybrid.runtime.env import cuda_include_dir

    try:
        nvrtc_version()
    except Exception as error:  # no cuda-python (ImportError) or no libnvrtc (the loader's own error)
        return (
            f"NVRTC is not usable beside this ROCm build of torch ({type(error).__name__}: {error}); "
            f"the sm_90a compile tests need {runtime.PIP_HINT}"
        )
    if cuda_include_dir() is None:
        return "CUDA headers (cuda_fp16.h) not found: pip install nvidia-cuda-runtime, or set CUDA_HOME"
    return None


def skip_if_unsupported(backend: str, case: dict) -> None:
    """Skip (with the backend's own reason) when a forced backend cannot run this call."""
    reason = unsupported_reason(backend, case)
    if reason is not None:
        pytest.skip(f"{backend} cannot run this call: {reason}")


def unsupported_reason(backend: str, case: dict) -> str | None:
    """Why a forced backend cannot run the call of ``case`` (None for "auto"): what
    ``dispatch.unavailable_reason`` says."""
    if backend == "auto":
        return None
    from pa_hybrid import dispatch
    from pa_hybrid.call import build_call

    scratchless = dict(case, exp_sums=None, max_logits=None, tmp_out=None)
    for name in ("out_", "backend"):
        scratchless.pop(name, None)
    call = build_call(**scratchless)
    return dispatch.unavailable_reason(backend, call.key)


REPO_ROOT = Path(__file__).resolve().parents[1]


def load_script(path):
    """Import a script (``benchmarks/...``, ``examples/...``: relative to the repository, or
    a Path) as a module named after its file, registered in ``sys.modules`` (dataclasses look
    their module up there)."""
    path = REPO_ROOT / path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
