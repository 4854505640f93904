"""Host-side cost of paged_attention_common, per backend (GPU only).

* cold call: the first call of a fresh process with an empty kernel cache
  (PA_HYBRID_CACHE_DIR pointed at a new directory): compiles (hip: NVRTC; triton:
  Triton's JIT), loads and runs; then a warm call in the same process.
* per-call host overhead, eager: microseconds of CPU time per call (process time over
  many back-to-back calls of a tiny problem, so the GPU is never the bottleneck).

    python benchmarks/bench_host_overhead.py [--calls 2000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

COLD = """
import time, torch, pa_hybrid
from pa_hybrid.testing import make_decode_case
case = make_decode_case([300, 40], num_heads=32, num_kv_heads=8, device="cuda")
for label in ("cold", "warm"):
    torch.cuda.synchronize(); t = time.perf_counter()
    pa_hybrid.paged_attention_common(exp_sums=None, max_logits=None, tmp_out=None, backend="{backend}", **case)
    torch.cuda.synchronize(); print(label, round(time.perf_counter() - t, 3))
"""


def cold_call_seconds(backend: str) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, PA_HYBRID_CACHE_DIR=cache, TRITON_CACHE_DIR=os.path.join(cache, "triton"))
        done = subprocess.run([sys.executable, "-c", COLD.format(backend=backend)], env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return {label: float(s) for label, s in (line.split() for line in done.stdout.split("\n") if line)}


def host_us_per_call(backend: str, calls: int) -> float:
    import torch

    import pa_hybrid
    from pa_hybrid.layouts import allocate_scratch
    from pa_hybrid.testing import make_decode_case

    case = make_decode_case([16], num_heads=32, num_kv_heads=8, device="cuda")
    scratch = allocate_scratch(1, 32, 128, case["max_seq_len"], "cuda")
    out = torch.empty_like(case["Q"])
    call = dict(case, exp_sums=scratch[0], max_logits=scratch[1], tmp_out=scratch[2], out_=out, backend=backend)
    for _ in range(20):
        pa_hybrid.paged_attention_common(**call)
    torch.cuda.synchronize()
    start = time.process_time()
    for _ in range(calls):
        pa_hybrid.paged_attention_common(**call)
    cpu = time.process_time() - start
    torch.cuda.synchronize()
    return cpu / calls * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_host_overhead: needs a CUDA GPU; nothing measured")
        return 0
    from pa_hybrid import dispatch

    print(f"{torch.cuda.get_device_name()}: host cost of one paged_attention_common call")
    print(f"{'backend':8} {'cold call s':>11} {'warm call s':>11} {'host us/call':>12}")
    for backend in [b for b in dispatch.available_backends("cuda") if b != "torch"] + ["auto"]:
        times = cold_call_seconds(backend)
        print(f"{backend:8} {times['cold']:11.2f} {times['warm']:11.3f} {host_us_per_call(backend, args.calls):12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
