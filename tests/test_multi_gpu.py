"""Two GPUs in one process (issue 8): every backend on cuda:1 while cuda:0 is current, and
both GPUs at once from two threads with their own streams. Skipped, with the reason, on a
machine with fewer than two CUDA GPUs."""

import threading

import pytest
import torch

from pa_hybrid import dispatch, paged_attention_common, reference_paged_attention
from pa_hybrid.testing import make_decode_case

from conftest import skip_if_unsupported

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
requires_two_gpus = pytest.mark.skipif(GPUS < 2, reason=f"needs two CUDA GPUs in one process (this machine has {GPUS})")
BACKENDS = dispatch.available_backends("cuda:1") + ["auto"] if GPUS >= 2 else ["auto"]
KV_DTYPES = [torch.bfloat16, torch.float8_e4m3fn, torch.int8]


def _case(device, kv_dtype):
    # ragged, with a split-KV length (several partitions) and an empty context
    return make_decode_case([0, 1, 300, 2049], num_heads=16, num_kv_heads=2, kv_dtype=kv_dtype, device=device)


def _relative_error(case, backend) -> float:
    out = torch.full_like(case["Q"], float("nan"))
    result = paged_attention_common(exp_sums=None, max_logits=None, tmp_out=None, out_=out, backend=backend, **case)
    assert result.device == case["Q"].device
    torch.cuda.current_stream(case["Q"].device).synchronize()
    ref = reference_paged_attention(**case)
    return ((out.float() - ref).norm() / ref.norm()).item()


@requires_two_gpus
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=lambda d: str(d)[6:])
def test_backend_runs_on_the_second_gpu_while_the_first_is_current(backend, kv_dtype):
    torch.cuda.set_device(0)
    case = _case("cuda:1", kv_dtype)
    skip_if_unsupported(backend, case)
    assert _relative_error(case, backend) < (1e-2 if kv_dtype.itemsize == 2 else 3e-2)
    assert torch.cuda.current_device() == 0  # the call did not move the current device


@requires_two_gpus
@pytest.mark.parametrize("backend", BACKENDS)
def test_both_gpus_at_once_from_two_threads_with_their_own_streams(backend):
    errors, failures = {}, []

    def worker(index: int):
        try:
            torch.cuda.set_device(index)
            with torch.cuda.stream(torch.cuda.Stream(index)):
                errors[index] = [_relative_error(_case(f"cuda:{index}", kv), backend) for kv in KV_DTYPES for _ in range(3)]
        except Exception as e:  # re-raised in the main thread below
            failures.append(e)

    skip_if_unsupported(backend, _case("cuda:1", torch.bfloat16))
    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]
    for index in (0, 1):
        assert max(errors[index]) < 3e-2, (index, errors[index])
