"""Test setup: without a GPU every Triton kernel runs under Triton's CPU
interpreter (TRITON_INTERPRET=1, set before triton is imported); with one, the
same tests run on ``cuda`` with the kernels compiled for it."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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


def pytest_report_header(config):
    mode = "GPU: " + torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU: Triton interpreter"
    return f"pa_hybrid tests on {mode}"


requires_gpu = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU (none found; CPU runs use the Triton interpreter)")


def skip_if_unsupported(backend: str, case: dict) -> None:
    """Skip (with the backend's own reason) when a forced backend cannot run this call."""
    if backend == "auto":
        return
    from pa_hybrid import dispatch
    from pa_hybrid.call import build_call

    scratchless = dict(case, exp_sums=None, max_logits=None, tmp_out=None)
    for name in ("out_", "backend"):
        scratchless.pop(name, None)
    reason = dispatch.unavailable_reason(backend, build_call(**scratchless).key)
    if reason is not None:
        pytest.skip(f"{backend} cannot run this call: {reason}")
