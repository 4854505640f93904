"""A model of a split-KV stage 1 bound by its programs rather than by DRAM: programs start in
launch order, ``slots`` at a time (programs per SM x SMs); each takes ``start_us`` to start,
then reads its bytes at most at ``rate`` (one program's rate), all of them together at most at
the read bandwidth. Replayed on the grid's mixed-length batch, cut into static partitions, it
shows how much of a call is its last wave (benchmarks/RESULTS.md section 42: Triton on the
one-kv-head mixed batch, 2 programs per SM at about 8.5 GB/s each). No GPU: a calculation.

    python benchmarks/model_program_waves.py [--workload W] [--model qwen3-235b-tp4] [--kv-bytes 2]
        [--partitions 512 768 1024 2048] [--slots 264] [--rate-gbps 8.5] [--start-us 1] [--bandwidth-tbps 3.2]
"""

import argparse

from pa_hybrid.bench.decode import load_workload, mixed_context_lens


def stage1_us(program_bytes: list, slots: int, rate: float, bandwidth: float, start_us: float) -> float:
    """Time until the last program ends (bytes per us for ``rate`` and ``bandwidth``)."""
    queue, running, now = list(program_bytes), [], 0.0  # running: [us to start, bytes left]
    while queue or running:
        while queue and len(running) < slots:
            running.append([start_us, float(queue.pop(0))])
        reading = sum(1 for to_start, _ in running if to_start <= 0)
        each = min(rate, bandwidth / reading) if reading else 0.0
        step = min(to_start if to_start > 0 else left / each for to_start, left in running)
        now += step
        for program in running:
            if program[0] > 0:
                program[0] -= step
            else:
                program[1] -= each * step
        running = [p for p in running if p[0] > 1e-9 or p[1] > 1e-6]
    return now


def partition_bytes(context_lens, partition: int, bytes_per_token: int, kv_heads: int) -> list:
    """One program per (sequence, kv head, partition), in the launch order of the static grid."""
    return [
        min(partition, length - start) * bytes_per_token
        for length in context_lens
        for _ in range(kv_heads)
        for start in range(0, length, partition)
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default=None)
    parser.add_argument("--model", default="qwen3-235b-tp4")
    parser.add_argument("--kv-bytes", type=int, default=2, help="bytes per cache element")
    parser.add_argument("--partitions", nargs="+", type=int, default=[512, 768, 1024, 2048])
    parser.add_argument("--slots", type=int, default=264)
    parser.add_argument("--rate-gbps", type=float, default=8.5)
    parser.add_argument("--start-us", type=float, default=1.0)
    parser.add_argument("--bandwidth-tbps", type=float, default=3.2)
    args = parser.parse_args(argv)
    workload = load_workload(args.workload)
    mixed = workload["mixed_lengths"]
    shape = workload["models"][args.model]
    lens = mixed_context_lens(mixed["num_seqs"], mixed["min_len"], mixed["max_len"], mixed["seed"])
    bytes_per_token = 2 * workload["head_size"] * args.kv_bytes
    rate, bandwidth = args.rate_gbps * 1e3, args.bandwidth_tbps * 1e6
    total = sum(lens) * shape["num_kv_heads"] * bytes_per_token
    print(
        f"{args.model}, {mixed['num_seqs']} x mixed, {total / 1e6:.0f} MB: bytes / bandwidth {total / bandwidth:.1f} us, "
        f"bytes / (slots x rate) {total / (args.slots * rate):.1f} us"
    )
    print(f"{'partition':>9s} {'programs':>8s} {'launch order':>12s} {'longest first':>13s}")
    for partition in args.partitions:
        work = partition_bytes(lens, partition, bytes_per_token, shape["num_kv_heads"])
        times = [stage1_us(order, args.slots, rate, bandwidth, args.start_us) for order in (work, sorted(work, reverse=True))]
        print(f"{partition:9d} {len(work):8d} {times[0]:12.1f} {times[1]:13.1f}")


if __name__ == "__main__":
    main()
