"""Does where the allocator puts a case's tensors move its time? One grid case (its read row
and the backends named) timed as the benchmark times it, in a row of allocator states: fresh;
right after a large buffer was written and freed (``empty_cache``); after a pause; with the
large buffer freed but still in torch's cache (the case then lands inside it). Run it once
with the default allocator and once with ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``
(the benchmark's own setting, ``pa_hybrid.bench.timing.ALLOCATOR_CONF``): this script leaves
the variable as it finds it and prints which one ran. RESULTS.md section 40: with the
default allocator llama3-8b bf16 256x512 took 12-14% longer in some states, read row
included; with expandable segments it did not move.

    python benchmarks/probe_allocator_placement.py --workload ../shared/bench/workload.json \\
        --case llama3-8b:256:512:bf16 --backends hip --free-gib 4 24 40
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from pa_hybrid.bench import decode, timing
from probe_second_call import case_spec  # the script's own folder


def allocator_states(free_gib: list, pause_s: float) -> list:
    """``[(label, prepare)]``: the states each timing of the case follows, in order. Each
    ``prepare(device)`` returns what must stay alive while the case runs (or None)."""

    def written_and_freed(gib, keep_cached=False):
        def prepare(device):
            buffer = torch.empty(gib << 30, dtype=torch.uint8, device=device)
            buffer.fill_(1)
            del buffer
            torch.cuda.synchronize(device)
            if not keep_cached:
                torch.cuda.empty_cache()
            return None

        return prepare

    def paused(gib):
        def prepare(device):
            written_and_freed(gib)(device)
            time.sleep(pause_s)

        return prepare

    states = [("fresh", lambda device: None)]
    for gib in free_gib:
        states += [(f"right after {gib} GiB written and freed", written_and_freed(gib)), ("again", lambda device: None)]
    largest = max(free_gib)
    states += [
        (f"{pause_s:g} s after {largest} GiB freed", paused(largest)),
        (f"{largest} GiB freed into torch's cache", written_and_freed(largest, keep_cached=True)),
        ("cache released", lambda device: torch.cuda.empty_cache()),
    ]
    return states


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default=None)
    p.add_argument("--case", default="llama3-8b:256:512:bf16", help="MODEL:NUM_SEQS:CTX:KV of the grid")
    p.add_argument("--backends", nargs="+", default=["hip"])
    p.add_argument("--free-gib", nargs="+", type=int, default=[4, 24, 40])
    p.add_argument("--pause-s", type=float, default=3.0)
    p.add_argument("--samples", type=int, default=15)
    args = p.parse_args(argv)
    try:
        spec = case_spec(decode.load_workload(args.workload), args.case)
    except ValueError as e:
        p.error(str(e))
    device = torch.device("cuda", torch.cuda.current_device())
    bandwidth = timing.measure_read_bandwidth(device)
    print(f"read bandwidth {bandwidth / 1e12:.3f} TB/s; PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF')!r} "
          f"(expandable segments: {timing.expandable_segments_in_use()}); {spec.label}")  # fmt: skip
    timer = timing.InterleavedTimer(graphs=True, samples=args.samples)
    for label, prepare in allocator_states(args.free_gib, args.pause_s):
        kept = prepare(device)
        results = {r.backend: r for r in decode.run_case(spec, args.backends, device, bandwidth, timer, read_ceiling=True)}
        del kept
        cells = "  ".join(
            f"{name} {results[name].us:7.1f} us {results[name].pct_of_floor:5.1f}%" if results[name].us else f"{name} {results[name].status}"
            for name in [decode.READ] + args.backends
        )  # fmt: skip
        print(f"{label:40s} {cells}", flush=True)


if __name__ == "__main__":
    main()
