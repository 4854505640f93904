"""The decode benchmark: every backend of ``paged_attention_common`` on the shared grid.

For each case of ``workload.json`` (model x KV dtype x num_seqs x context length,
capped at ``max_tokens_per_case`` tokens, plus one mixed-length batch per model and
dtype) the benchmark builds a random problem on the GPU, checks every backend
against the float32 reference on sampled sequences, then times it (CUDA-graph
replay, cold L2, median of samples) and reports the time next to the call's
floor: the bytes it must move divided by the read bandwidth measured at the
start of the same run. Results go to a table on stdout, a CSV, a JSON (with the
GPU, versions, bandwidth and command line) and one plot per model and dtype.

Without a GPU only the portable path runs, on one tiny case, as a correctness
smoke test: nothing is timed.

    python -m pa_hybrid.bench --quick
    python -m pa_hybrid.bench --models llama3-8b --kv-dtypes fp8 --ctx 8192 mixed
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from ..call import SCALES_NONE, SCALES_PER_TOKEN, CallKey
from ..dispatch import BACKEND_NAMES, available_backends, policy_for
from ..layouts import allocate_scratch, is_8bit
from ..reference import reference_paged_attention
from ..testing import make_decode_case
from .peers import TOLERANCE_FP8_COMPUTE, available_peers, library_versions, peer_names
from .peers.inputs import peer_inputs

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_WORKLOAD = REPO_ROOT.parent / "shared" / "bench" / "workload.json"
"""``../shared/bench/workload.json`` next to the repository (a source checkout)."""

KV_LABELS = {"bfloat16": "bf16", "float16": "fp16", "float8_e4m3fn": "fp8", "int8": "int8"}
"""Short labels of the workload's KV dtype names, as in ``peers-h100.csv``."""

BASELINE = "torch"
"""The plain-torch backend: gather by block table + SDPA, the speedup baseline."""

READ = "read"
"""The row of ``--read-ceiling``: a contiguous streaming read of the call's floor bytes
(``timing.streaming_reads``, the fastest of its configurations), timed with the call.
Nothing that must read those bytes is expected to be faster, so on small calls, where
launch and ramp weigh, it shows how much of the floor is reachable at all."""

MIXED = "mixed"
"""The ``ctx`` label of the mixed-length case (and its ``--ctx`` filter value)."""

TOLERANCE_16BIT = 2e-2
TOLERANCE_8BIT = 4e-2
"""Largest accepted ``||out - ref|| / ||ref||`` over the checked rows, by KV cache width."""

CHECKED_SEQUENCES = 16
"""Sequences compared with the reference per case (spread across the batch): the
reference loops over sequences in float32, too slow for a whole 512-sequence batch."""

QUICK = {"num_seqs": [1, 64, 256], "ctx": ["512", "8192"], "kv_dtypes": ["bf16"]}
"""``--quick``: the first model of the workload at these points (under a minute on an H100)."""



# --------------------------------------------------------------------------- #
# The grid
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class DecodeCase:
    """One point of the grid: the shape of a decode call, before any data exists."""

    model: str
    kv: str  # short label: bf16, fp16, fp8, int8
    num_seqs: int
    ctx: str  # the context length as text, or "mixed"
    context_lens: tuple
    num_heads: int
    num_kv_heads: int
    head_size: int
    block_size: int
    q_dtype: torch.dtype
    kv_dtype: torch.dtype
    max_qlen: int = 1  # new tokens per sequence (a model entry's "max_qlen": speculative decoding)

    @property
    def label(self) -> str:
        return f"{self.model} {self.kv} num_seqs={self.num_seqs} ctx={self.ctx}"

    @property
    def kv_bytes(self) -> int:
        """Bytes of K and V the call must read: every context token, as stored."""
        element = self.kv_dtype.itemsize
        return 2 * sum(self.context_lens) * self.num_kv_heads * self.head_size * element

    def call_key(self, device) -> CallKey:
        """The key the dispatcher sees for this call (as :meth:`build` makes it: ``max_qlen`` new tokens a sequence,
        per-token scales on 8-bit caches, ``max_seq_len`` the longest context)."""
        device = torch.device(device)
        return CallKey(
            device_type=device.type,
            device_index=device.index if device.index is not None else 0,
            q_dtype=self.q_dtype,
            kv_dtype=self.kv_dtype,
            head_size=self.head_size,
            block_size=self.block_size,
            gqa=self.num_heads // self.num_kv_heads,
            num_kv_heads=self.num_kv_heads,
            max_qlen=self.max_qlen,
            scales=SCALES_PER_TOKEN if is_8bit(self.kv_dtype) else SCALES_NONE,
            high_precision=1,
            kernel_name=None,
            concurrency=self.num_seqs,
            max_seq_len=max(self.context_lens),
        )

    def build(self, device, seed: int = 0, scales: str = "per_token") -> dict:
        """The keyword arguments of ``paged_attention_common`` on random data (8-bit
        caches with per-token scales, the layout the asm kernels serve, unless ``scales``
        says otherwise: see ``make_decode_case``)."""
        return make_decode_case(
            list(self.context_lens),
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_size=self.head_size,
            block_size=self.block_size,
            q_dtype=self.q_dtype,
            kv_dtype=self.kv_dtype,
            max_qlen=self.max_qlen,
            scales=scales,
            device=device,
            seed=seed,
        )


TINY_CPU_CASE = DecodeCase(
    model="llama3-8b", kv="bf16", num_seqs=2, ctx="100", context_lens=(100, 100), num_heads=32, num_kv_heads=8,
    head_size=128, block_size=16, q_dtype=torch.bfloat16, kv_dtype=torch.bfloat16,
)  # fmt: skip
"""The one case run without a GPU: two sequences of 100 tokens, llama3-8b heads, bf16."""


def load_workload(path=None) -> dict:
    """The grid from ``path`` (default: :data:`DEFAULT_WORKLOAD`)."""
    path = Path(path) if path is not None else DEFAULT_WORKLOAD
    if not path.is_file():
        raise FileNotFoundError(f"workload: no file at {path} (pass --workload PATH to the shared workload.json)")
    return json.loads(path.read_text())


def mixed_context_lens(num_seqs: int, min_len: int, max_len: int, seed: int) -> list:
    """``num_seqs`` lengths drawn log-uniformly from ``[min_len, max_len]`` with a CPU
    torch generator seeded ``seed`` (the same lengths on every machine)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(num_seqs, generator=g, dtype=torch.float64)
    lens = torch.exp(math.log(min_len) + u * (math.log(max_len) - math.log(min_len)))
    return [min(max_len, max(min_len, round(v))) for v in lens.tolist()]


def kv_label(name: str) -> str:
    """The short label (bf16, fp8, ...) of a KV dtype given by its workload name or label."""
    if name in KV_LABELS.values():
        return name
    if name in KV_LABELS:
        return KV_LABELS[name]
    raise ValueError(f"kv dtype: expected one of {sorted(KV_LABELS) + sorted(KV_LABELS.values())}, got {name!r}")


def enumerate_cases(workload: dict, *, models=None, kv_dtypes=None, num_seqs=None, ctx=None) -> list:
    """Every case of the grid, in model, dtype, num_seqs, ctx order, then the mixed case
    of each model and dtype.

    A case is kept when ``num_seqs * ctx <= max_tokens_per_case`` and it passes every
    filter given (None keeps all): ``models`` names, ``kv_dtypes`` labels or workload
    names, ``num_seqs`` ints, ``ctx`` context lengths as ints or strings, ``"mixed"``
    selecting the mixed-length case (which also has to pass the ``num_seqs`` filter).
    """
    for name in models or ():
        if name not in workload["models"]:
            raise ValueError(f"--models: {name!r} is not in the workload ({', '.join(workload['models'])})")
    wanted_kv = None if kv_dtypes is None else {kv_label(k) for k in kv_dtypes}
    wanted_ctx = None if ctx is None else {str(c) for c in ctx}
    mixed = workload["mixed_lengths"]
    cases = []
    for model, heads in workload["models"].items():
        if models is not None and model not in models:
            continue
        for kv_name in workload["kv_dtypes"]:
            label = kv_label(kv_name)
            if wanted_kv is not None and label not in wanted_kv:
                continue
            common = dict(
                model=model,
                kv=label,
                num_heads=heads["num_heads"],
                num_kv_heads=heads["num_kv_heads"],
                head_size=workload["head_size"],
                block_size=workload["block_size"],
                q_dtype=getattr(torch, workload["query_dtype"]),
                kv_dtype=getattr(torch, kv_name),
                max_qlen=heads.get("max_qlen", 1),
            )
            for n in workload["num_seqs"]:
                if num_seqs is not None and n not in num_seqs:
                    continue
                for length in workload["context_lens"]:
                    if n * length > workload["max_tokens_per_case"]:
                        continue
                    if wanted_ctx is not None and str(length) not in wanted_ctx:
                        continue
                    cases.append(DecodeCase(num_seqs=n, ctx=str(length), context_lens=(length,) * n, **common))
            if (wanted_ctx is None or MIXED in wanted_ctx) and (num_seqs is None or mixed["num_seqs"] in num_seqs):
                lens = mixed_context_lens(mixed["num_seqs"], mixed["min_len"], mixed["max_len"], mixed["seed"])
                cases.append(DecodeCase(num_seqs=mixed["num_seqs"], ctx=MIXED, context_lens=tuple(lens), **common))
    return cases


# --------------------------------------------------------------------------- #
# The floor and the correctness check
# --------------------------------------------------------------------------- #


def decode_bytes(case: dict) -> int:
    """Bytes one ``paged_attention_common(**case)`` call must move at the least.

    K and V of every context token as stored (1 byte per element for 8-bit caches),
    the per-token scales of those tokens (per-token scales win over per-tensor ones,
    as in the call; 16-bit caches read none), Q, the block-table entries that cover
    each context, ``context_lens``, ``qo_indptr`` when given, and the output written
    (the dtype of Q). Split-KV scratch is not counted: it is the kernel's own overhead.
    Reads ``context_lens`` back to the host.
    """
    K, Q = case["K"], case["Q"]
    _, num_kv_heads, _, block_size, x = K.shape
    head_size = K.shape[2] * x
    lens = case["context_lens"].tolist()
    tokens = sum(lens)
    total = 2 * tokens * num_kv_heads * head_size * K.element_size()
    if K.element_size() == 1:  # an 8-bit cache (fp8 may be stored as uint8): its scales are read
        if case.get("K_QScale_asm") is not None:
            total += 2 * tokens * num_kv_heads * case["K_QScale_asm"].element_size()
        elif case.get("K_QScale_hip") is not None:
            total += case["K_QScale_hip"].nbytes + case["V_QScale_hip"].nbytes
    total += 2 * Q.numel() * Q.element_size()  # Q read, out written
    total += sum(-(-n // block_size) for n in lens) * case["block_tables"].element_size()
    total += case["context_lens"].nbytes
    if case.get("qo_indptr") is not None:
        total += case["qo_indptr"].nbytes
    return total


def spread_indices(num_seqs: int, count: int = CHECKED_SEQUENCES) -> list:
    """Up to ``count`` distinct sequence indices evenly spread over ``[0, num_seqs)``,
    first and last included."""
    if num_seqs <= count:
        return list(range(num_seqs))
    return sorted({round(i * (num_seqs - 1) / (count - 1)) for i in range(count)})


def query_rows(case: dict, seq_indices) -> list:
    """The rows of Q (and of the output) that belong to the sequences ``seq_indices``."""
    indptr = case.get("qo_indptr")
    if indptr is None:
        return list(seq_indices)
    bounds = indptr.tolist()
    return [r for s in seq_indices for r in range(bounds[s], bounds[s + 1])]


def slice_case(case: dict, seq_indices) -> dict:
    """The call restricted to the sequences ``seq_indices``, in that order.

    The caches and scales are shared (not copied); Q, the block table, the context
    lengths and ``qo_indptr`` keep only the chosen sequences, ``max_seq_len`` becomes
    the longest kept context. Row ``i`` of its result is row ``query_rows(case,
    seq_indices)[i]`` of the full call's result.
    """
    seq = torch.tensor(list(seq_indices), dtype=torch.long, device=case["context_lens"].device)
    rows = torch.tensor(query_rows(case, seq_indices), dtype=torch.long, device=case["Q"].device)
    context_lens = case["context_lens"][seq]
    table = case["block_tables"][seq]
    sliced = dict(
        case,
        Q=case["Q"][rows],
        block_tables=table,
        block_tables_stride0=table.stride(0),
        context_lens=context_lens,
        max_seq_len=max([1] + context_lens.tolist()),
    )
    if case.get("qo_indptr") is not None:
        counts = (case["qo_indptr"][1:] - case["qo_indptr"][:-1])[seq]
        sliced["qo_indptr"] = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(case["qo_indptr"].dtype)
    return sliced


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (NaN anywhere gives NaN)."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def tolerance_for(kv_dtype: torch.dtype) -> float:
    return TOLERANCE_8BIT if is_8bit(kv_dtype) else TOLERANCE_16BIT


# --------------------------------------------------------------------------- #
# Results, table, CSV, JSON, plot
# --------------------------------------------------------------------------- #

OK, WRONG, NOT_AVAILABLE, OOM, ERROR = "ok", "WRONG", "n/a", "oom", "error"


@dataclass
class Result:
    """One backend on one case. ``status``: "ok" (checked and timed), "WRONG" (failed
    the check, not timed), "n/a" (the backend refuses the call), "oom" or "error";
    ``reason`` says why for every status but "ok"."""

    model: str
    kv: str
    num_seqs: int
    ctx: str
    mbytes: float  # K+V bytes / 1e6
    floor_bytes: int
    floor_us: float | None  # floor_bytes / read bandwidth; None without a GPU
    backend: str
    status: str
    us: float | None = None
    gbps: float | None = None  # floor_bytes / us
    pct_of_floor: float | None = None  # 100 * floor_us / us
    us_above_floor: float | None = None
    pct_of_read: float | None = None  # 100 * the read row's time / us (--read-ceiling)
    speedup_vs_torch: float | None = None
    speedup_vs_peer: float | None = None  # ours: the fastest peer's time on the case / ours
    chosen: str | None = None  # the backend "auto" ran; for the read row, its kernel configuration
    regret: float | None = None  # auto: its time over the fastest other backend's in the same run
    rel_err: float | None = None
    reason: str | None = None

    def with_time(self, us: float) -> "Result":
        """This result timed at ``us`` microseconds, with the floor-relative figures
        (those need ``floor_us``: None when the read bandwidth was not measured)."""
        if self.floor_us is None:
            return replace(self, us=us, gbps=self.floor_bytes / us / 1e3)
        return replace(
            self,
            us=us,
            gbps=self.floor_bytes / us / 1e3,
            pct_of_floor=100.0 * self.floor_us / us,
            us_above_floor=us - self.floor_us,
        )


def add_relative_figures(results: list) -> None:
    """Fill, for timed results, ``speedup_vs_torch`` (baseline time / time) where the
    torch baseline was timed too; ``pct_of_read`` where the read row (:data:`READ`)
    was; for our backends ``speedup_vs_peer`` (the fastest peer's time / ours) where a
    peer was timed; and for "auto" its ``regret``: its time over the fastest of our
    other backends on the same case (1.0 = auto picked the fastest; peers do not count)."""
    peers = set(peer_names())
    by_case = {}
    for r in results:
        if r.us is not None:
            by_case.setdefault((r.model, r.kv, r.num_seqs, r.ctx), {})[r.backend] = r.us
    for r in results:
        times = by_case.get((r.model, r.kv, r.num_seqs, r.ctx), {})
        if r.us is None:
            continue
        if BASELINE in times:
            r.speedup_vs_torch = times[BASELINE] / r.us
        if READ in times and r.backend != READ:
            r.pct_of_read = 100.0 * times[READ] / r.us
        peer_times = [t for b, t in times.items() if b in peers]
        if peer_times and r.backend not in peers:
            r.speedup_vs_peer = min(peer_times) / r.us
        others = [t for b, t in times.items() if b in BACKEND_NAMES]
        if r.backend == "auto" and others:
            r.regret = r.us / min(others)


def regret_summary(results: list) -> str | None:
    """How close "auto" came to the fastest backend over the cases where both ran:
    the share within 3% and within 10%, the geometric mean and the worst case."""
    auto = [r for r in results if r.backend == "auto" and r.regret is not None]
    if not auto:
        return None
    within = lambda limit: sum(r.regret <= 1 + limit for r in auto)  # noqa: E731
    worst = max(auto, key=lambda r: r.regret)
    geomean = math.exp(sum(math.log(r.regret) for r in auto) / len(auto))
    return (
        f"auto vs the fastest backend, {len(auto)} cases: within 3% on {within(0.03)} "
        f"({100 * within(0.03) / len(auto):.1f}%), within 10% on {within(0.10)}; geomean regret {geomean:.3f}; "
        f"worst {worst.regret:.2f}x ({worst.model} {worst.kv} num_seqs={worst.num_seqs} ctx={worst.ctx}, "
        f"picked {worst.chosen})"
    )


def _number(fmt):
    return lambda v: "-" if v is None else format(v, fmt)


TABLE_COLUMNS = (
    # header, Result field, width, format of a value
    ("model", "model", 15, str),
    ("kv", "kv", 4, str),
    ("num_seqs", "num_seqs", 8, str),
    ("ctx", "ctx", 6, str),
    ("MB", "mbytes", 8, _number(".1f")),
    ("backend", "backend", 10, str),
    ("us", "us", 9, _number(".1f")),  # the status instead when not timed
    ("GB/s", "gbps", 7, _number(".0f")),
    ("%floor", "pct_of_floor", 6, _number(".1f")),
    ("+us", "us_above_floor", 8, _number(".1f")),
    ("%read", "pct_of_read", 6, _number(".1f")),
    ("xtorch", "speedup_vs_torch", 6, _number(".2f")),
    ("xpeer", "speedup_vs_peer", 5, _number(".2f")),
    ("chosen", "chosen", 6, lambda v: v or ""),
    ("regret", "regret", 6, _number(".2f")),
)
"""The printed table: K+V megabytes, time, effective GB/s (floor bytes / time), % of the
floor, microseconds above the floor, % of the read row's speed (``--read-ceiling``),
speedup over the torch baseline and over the fastest peer, auto's choice and its regret
(time over our fastest backend's)."""


def format_table_header() -> str:
    return "  ".join(header.rjust(width) for header, _, width, _ in TABLE_COLUMNS)


def format_table_row(result: Result) -> str:
    """One line of the table; an untimed result shows its status in the ``us`` column."""
    cells = []
    for _, name, width, fmt in TABLE_COLUMNS:
        text = result.status if name == "us" and result.us is None else fmt(getattr(result, name))
        cells.append(text.rjust(width))
    return "  ".join(cells)


def format_table(results: list) -> str:
    return "\n".join([format_table_header()] + [format_table_row(r) for r in results])


def write_csv(results: list, path) -> None:
    """One row per (case, backend), every field of :class:`Result`."""
    names = [f.name for f in fields(Result)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        for r in results:
            writer.writerow(asdict(r))


def write_json(results: list, meta: dict, path) -> None:
    """``meta`` (machine, versions, bandwidth, command) plus ``results`` as a list of rows."""
    Path(path).write_text(json.dumps(dict(meta, results=[asdict(r) for r in results]), indent=1) + "\n")


def plot_results(results: list, out_dir, stem: str) -> list:
    """One PNG per (model, kv dtype): % of floor against num_seqs (log axis), one panel
    per context length (the mixed case in its own panel), one line per backend.
    Returns the paths written (none if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    timed = [r for r in results if r.pct_of_floor is not None]
    backends = list(dict.fromkeys(r.backend for r in timed))
    colors = {b: f"C{i}" for i, b in enumerate(backends)}
    paths = []
    for model, kv in dict.fromkeys((r.model, r.kv) for r in timed):
        group = [r for r in timed if r.model == model and r.kv == kv]
        contexts = sorted({r.ctx for r in group}, key=lambda c: (c == MIXED, int(c) if c != MIXED else 0))
        fig, axes = plt.subplots(1, len(contexts), figsize=(4 * len(contexts), 3.6), sharey=True, squeeze=False)
        for ax, ctx in zip(axes[0], contexts):
            for backend in backends:
                points = sorted((r.num_seqs, r.pct_of_floor) for r in group if r.ctx == ctx and r.backend == backend)
                if points:
                    # auto retraces the backend it picks; the read row is a bound, not a backend
                    style = {"auto": "--", READ: ":"}.get(backend, "-")
                    color = "black" if backend == READ else colors[backend]
                    ax.plot(*zip(*points), style, marker="o", label=backend, color=color)
            ax.axhline(100.0, color="grey", linewidth=0.8, linestyle=":")
            ax.set_xscale("log", base=2)
            concurrencies = sorted({r.num_seqs for r in group if r.ctx == ctx})
            ax.set_xticks(concurrencies)
            ax.set_xticklabels([str(n) for n in concurrencies])
            ax.set_ylim(bottom=0)
            ax.set_title(f"ctx {ctx}")
            ax.set_xlabel("num_seqs")
            ax.grid(True, alpha=0.3)
        axes[0][0].set_ylabel("% of floor (higher is better)")
        axes[0][-1].legend(fontsize="small")
        fig.suptitle(f"{model}, {kv} KV cache")
        fig.tight_layout()
        path = Path(out_dir) / f"{stem}-{model}-{kv}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- #
# Running
# --------------------------------------------------------------------------- #


def _call_kwargs(case: dict, device) -> dict:
    """``case`` plus caller-owned scratch and output, as an engine passes them."""
    Q = case["Q"]
    exp_sums, max_logits, tmp_out = allocate_scratch(Q.shape[0], Q.shape[1], Q.shape[2], case["max_seq_len"], device)
    return dict(case, exp_sums=exp_sums, max_logits=max_logits, tmp_out=tmp_out, out_=torch.empty_like(Q))


def _chosen_backend(kwargs: dict) -> str | None:
    """The backend "auto" runs for this call, from ``select_backend`` or ``explain``."""
    import pa_hybrid

    select = getattr(pa_hybrid, "select_backend", None)
    explain = getattr(pa_hybrid, "explain", None)
    try:
        if select is not None:
            return select(**kwargs)
        return explain(**kwargs).backend if explain is not None else None
    except (ValueError, TypeError, RuntimeError):  # "auto" refuses the call: its run says why
        return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _check_call(result: Result, call, out: torch.Tensor, ref: torch.Tensor, rows: list, tolerance: float):
    """Run ``call`` once with ``out`` poisoned and compare ``out[rows]`` with ``ref``:
    ``(result, call)`` if correct, else ``(result with its status and reason, None)``."""
    try:
        if out.is_floating_point():
            out.fill_(float("nan"))  # a call that writes nothing fails the check
        call()
        result.rel_err = relative_error(out[rows], ref)
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        return replace(result, status=OOM, reason=_first_line(e)), None
    except (ValueError, TypeError, RuntimeError) as e:  # the call is refused
        return replace(result, status=NOT_AVAILABLE, reason=_first_line(e)), None
    except Exception as e:  # e.g. a kernel that does not compile: reported, and the run goes on
        return replace(result, status=ERROR, reason=_first_line(e)), None
    if not result.rel_err < tolerance:
        return replace(result, status=WRONG, reason=f"relative error {result.rel_err:.3g} >= {tolerance:g}"), None
    return result, call


def check(template: Result, kwargs: dict, backend: str, ref: torch.Tensor, rows: list, tolerance: float):
    """One backend on one case: run it and compare ``rows`` of its output with ``ref``.
    Returns the result (status "ok" if correct; refusals, OOM and other failures get
    their status and reason) and, if correct, the call to time (else None)."""
    import pa_hybrid

    result = replace(template, backend=backend, status=OK)
    if backend == "auto":
        result.chosen = _chosen_backend(kwargs)

    def call():
        pa_hybrid.paged_attention_common(**kwargs, backend=backend)

    return _check_call(result, call, kwargs["out_"], ref, rows, tolerance)


def check_peers(template: Result, peers: list, case: dict, seq_indices: list, tolerance: float) -> list:
    """Each peer (``pa_hybrid.bench.peers``) on the case, as :func:`check` does for our
    backends: the call converted once for all of them (:func:`peer_inputs`), each
    peer prepared (outside any timing) and its rows of the sequences ``seq_indices``
    checked against the reference of the peers' inputs (``PeerInputs.reference``:
    8-bit caches are requantized for them), peers that compute in fp8 with
    :data:`TOLERANCE_FP8_COMPUTE`. Their results' floor is their own call's (no per-token
    scales to read). Returns ``[(result, call or None)]``."""
    try:
        inputs = peer_inputs(case)
        ref = inputs.reference(seq_indices)
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        return [(replace(template, backend=p.name, status=OOM, reason=f"converting: {_first_line(e)}"), None) for p in peers]
    except ValueError as e:
        return [(replace(template, backend=p.name, status=NOT_AVAILABLE, reason=_first_line(e)), None) for p in peers]
    # the peers' floor: the same call without scale reads (they take one K and one V scale as numbers)
    floor_bytes = decode_bytes({**case, "K_QScale_asm": None, "V_QScale_asm": None, "K_QScale_hip": None, "V_QScale_hip": None})
    floor_us = None if template.floor_us is None else template.floor_us * floor_bytes / template.floor_bytes
    template = replace(template, floor_bytes=floor_bytes, floor_us=floor_us)
    checked = []
    for peer in peers:
        result = replace(template, backend=peer.name, status=OK)
        reason = peer.supports(inputs)
        if reason is not None:
            checked.append((replace(result, status=NOT_AVAILABLE, reason=reason), None))
            continue
        try:
            call, out = peer.prepare(inputs)
        except torch.cuda.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            checked.append((replace(result, status=OOM, reason=f"preparing: {_first_line(e)}"), None))
            continue
        except Exception as e:  # a peer that cannot set up (missing kernel, library error) is reported
            checked.append((replace(result, status=ERROR, reason=f"preparing: {_first_line(e)}"), None))
            continue
        limit = TOLERANCE_FP8_COMPUTE if peer.computes_in_fp8(inputs) else tolerance
        checked.append(_check_call(result, call, out, ref, seq_indices, limit))
    return checked


def time_checked(checked: list, timer) -> list:
    """The results of :func:`check`, the correct ones timed together by ``timer`` (an
    :class:`~pa_hybrid.bench.timing.InterleavedTimer`); a call that failed to
    capture becomes "oom" or "error" with the reason."""
    timings = timer({r.backend: call for r, call in checked if call is not None})
    results = []
    for result, call in checked:
        timing = timings.get(result.backend)
        if timing is None:
            results.append(result)
        elif isinstance(timing, torch.cuda.OutOfMemoryError):
            results.append(replace(result, status=OOM, reason=_first_line(timing)))
        elif isinstance(timing, BaseException):
            results.append(replace(result, status=ERROR, reason=f"while timing: {_first_line(timing)}"))
        else:
            results.append(result.with_time(timing.median_us))
    return results


def check_reads(template: Result, nbytes: int, device) -> list:
    """The candidates of the read row: one ``(result, launch)`` per configuration of
    ``timing.streaming_reads`` (backend ``read:<configuration>``, each checked by its
    sum), or the read row with its failure."""
    from .timing import streaming_reads

    try:
        launches = streaming_reads(nbytes, device)
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        return [(replace(template, backend=READ, status=OOM, reason=_first_line(e)), None)]
    return [(replace(template, backend=f"{READ}:{name}", status=OK), launch) for name, launch in launches.items()]


def keep_fastest_read(results: list) -> list:
    """``results`` with the read candidates of :func:`check_reads` replaced by one read
    row: the fastest of them, its configuration in ``chosen``."""
    candidates = [r for r in results if r.backend.startswith(READ + ":")]
    if not candidates:
        return results
    timed = [r for r in candidates if r.us is not None]
    best = min(timed, key=lambda r: r.us) if timed else candidates[0]
    read = replace(best, backend=READ, chosen=best.backend.split(":", 1)[1])
    return [r for r in results if not r.backend.startswith(READ + ":")] + [read]


def run_case(
    spec: DecodeCase, backends: list, device, read_bandwidth: float | None, timer, peers=(), read_ceiling: bool = False
) -> list:
    """Build ``spec`` on ``device``, compute the reference of the sampled sequences once,
    :func:`check` each backend (and :func:`check_peers` each of ``peers``), then time
    the correct ones together with ``timer`` (None: check only), with ``read_ceiling``
    the read row (:data:`READ`) among them. Frees the case's tensors before returning."""
    template = Result(
        model=spec.model, kv=spec.kv, num_seqs=spec.num_seqs, ctx=spec.ctx, mbytes=spec.kv_bytes / 1e6,
        floor_bytes=0, floor_us=None, backend="", status=OK,
    )  # fmt: skip
    try:
        case = spec.build(device)
        floor_bytes = decode_bytes(case)
        template = replace(
            template,
            floor_bytes=floor_bytes,
            floor_us=None if read_bandwidth is None else floor_bytes / read_bandwidth * 1e6,
        )
        kwargs = _call_kwargs(case, device)
        sampled = spread_indices(spec.num_seqs)
        ref = reference_paged_attention(**slice_case(case, sampled))
        rows = query_rows(case, sampled)
    except torch.cuda.OutOfMemoryError as e:
        case = kwargs = None  # drop what was built before emptying the cache
        torch.cuda.empty_cache()
        reason = f"building the case: {_first_line(e)}"
        return [replace(template, backend=b, status=OOM, reason=reason) for b in backends + [p.name for p in peers]]
    tolerance = tolerance_for(spec.kv_dtype)
    checked = [check(template, kwargs, b, ref, rows, tolerance) for b in backends]
    if peers:
        checked += check_peers(template, peers, case, sampled, tolerance)
    if read_ceiling and timer is not None:
        checked += check_reads(template, template.floor_bytes, device)
    results = [r for r, _ in checked] if timer is None else keep_fastest_read(time_checked(checked, timer))
    del case, kwargs, ref, checked
    # free the case's objects now (peers' wrappers hold pinned host buffers and may sit
    # in reference cycles): a garbage collection inside a later case's timing loop
    # would land in its samples
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return results


def default_backends(device) -> list:
    """Every backend available on ``device``, then "auto", then the torch baseline."""
    native = [b for b in available_backends(device) if b != BASELINE]
    return native + ["auto", BASELINE]


def run_portable_smoke(emit=print) -> int:
    """The no-GPU path: the tiny case through "triton" (Triton's interpreter) and "torch"
    on the CPU, checked against the reference; nothing is timed. Returns 0 if every
    backend that ran was correct."""
    spec = TINY_CPU_CASE
    emit("No CUDA GPU found: only the portable path (Triton interpreter and plain torch) runs, on one tiny case")
    emit(f"({spec.label}), checked against the float32 reference. No timing is meaningful here; nothing is written.")
    results = run_case(spec, ["triton", BASELINE], "cpu", None, None)
    for r in results:
        emit(f"{r.backend}: {r.status}" + (f", relative error {r.rel_err:.2e}" if r.rel_err is not None else "")
             + (f" ({r.reason})" if r.reason else ""))  # fmt: skip
    return 1 if any(r.status in (WRONG, ERROR) for r in results) else 0


def report_against_live_peers(results: list, names: list, gpu: str, out_dir: Path, stem: str) -> None:
    """After a ``--peers`` run: the fastest peer per case written as a bar
    (``{stem}-peers.csv``, the columns of ``peers-h100.csv``), auto compared with it
    (printed) and the speedups as a heat map (``{stem}-vs-peers.png``)."""
    from .compare import GpuCheck, compare, format_report, live_peer_rows, plot_speedups, write_peer_rows

    rows = [asdict(r) for r in results]
    bar = live_peer_rows(rows, names)
    if not bar:
        print("--peers: no peer was timed on any case; nothing to compare")
        return
    write_peer_rows(bar, out_dir / f"{stem}-peers.csv")
    try:
        comparison = compare(rows, bar, "auto")
    except ValueError as e:
        print(f"--peers: {e}", file=sys.stderr)
        return
    print(
        f"\nEvery peer was checked against the reference of its own inputs before timing (8-bit caches are "
        f"requantized to one scale per tensor for them): relative error below {TOLERANCE_16BIT:g} on 16-bit "
        f"caches, {TOLERANCE_8BIT:g} on 8-bit ones, {TOLERANCE_FP8_COMPUTE:g} for peers that compute in fp8."
    )
    print("\n" + format_report(comparison, GpuCheck(gpu, "this run", gpu, "this run")))
    plot = plot_speedups(comparison.cases, out_dir / f"{stem}-vs-peers.png", title=f"{gpu}: auto vs the fastest peer")
    print(f"wrote {out_dir / stem}-peers.csv" + (f" and {plot}" if plot else ""))


def git_commit() -> str | None:
    """The ``GIT_COMMIT`` environment variable if set (a copy of the tree whose ``.git``
    may be stale or absent), else ``HEAD`` of the repository (with "+dirty" if the tree
    has changes), else None."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]

    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        return head.stdout.strip() + ("+dirty" if git("status", "--porcelain").stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def command_line(module: str = "pa_hybrid.bench") -> str:
    """This process's command line, with ``-m module`` when it runs as ``python -m module``."""
    script = ["-m", module] if Path(sys.argv[0]).name in ("__main__.py", f"{module.rsplit('.', 1)[-1]}.py") else sys.argv[:1]
    return shlex.join([sys.executable] + script + sys.argv[1:])


def _split_list(values):
    """Values given as ``a b``, ``a,b`` or both; None when the option was not given."""
    if values is None:
        return None
    return [v for value in values for v in value.split(",") if v]


def add_grid_options(p: argparse.ArgumentParser, backends_help: str) -> None:
    """The options that select cases of the grid and backends (the benchmark's and the tuner's)."""
    p.add_argument("--workload", default=None, help=f"grid JSON (default {DEFAULT_WORKLOAD})")
    p.add_argument("--models", nargs="+", help="model names of the workload")
    p.add_argument("--kv-dtypes", nargs="+", help="bf16, fp8, int8 (or the workload's names)")
    p.add_argument("--num-seqs", nargs="+", help="batch sizes")
    p.add_argument("--ctx", nargs="+", help=f"context lengths, and/or '{MIXED}'")
    p.add_argument("--backends", nargs="+", help=backends_help)


def split_grid_options(args: argparse.Namespace) -> argparse.Namespace:
    """The list options of :func:`add_grid_options` given as ``a b``, ``a,b`` or both, as lists."""
    for name in ("models", "kv_dtypes", "ctx", "backends"):
        setattr(args, name, _split_list(getattr(args, name)))
    args.num_seqs = None if args.num_seqs is None else [int(n) for n in _split_list(args.num_seqs)]
    return args


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pa_hybrid.bench", description=__doc__.split("\n\n")[0])
    add_grid_options(p, "default: every available backend, auto, torch")
    p.add_argument("--quick", action="store_true", help="first model, bf16, num_seqs 1 64 256, ctx 512 8192")
    p.add_argument("--timing", choices=("graph", "eager"), default="graph")
    p.add_argument("--samples", type=int, default=40, help="timed samples per call (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before capture and before sampling")
    p.add_argument("--bandwidth-gb", type=float, default=2.0, help="GiB streamed to measure read bandwidth")
    p.add_argument(
        "--read-ceiling",
        action="store_true",
        help=f"also time a contiguous streaming read of each call's floor bytes (the '{READ}' row, and %%read)",
    )
    p.add_argument("--out", default="bench_out", help="directory for the CSV, JSON and plots")
    p.add_argument("--compare", metavar="PEERS.csv", help="then compare auto with a bar: ../shared/bench/peers-h100.csv")
    p.add_argument(
        "--peers",
        nargs="*",
        metavar="NAME",
        help=f"also run the peer kernels importable here ({', '.join(peer_names())}; all if none is named), "
        "then compare auto with the fastest of them per case",
    )
    args = split_grid_options(p.parse_args(argv))
    if args.peers is not None:
        args.peers = _split_list(args.peers)
        unknown = sorted(set(args.peers) - set(peer_names()))
        if unknown:
            p.error(f"--peers: {', '.join(unknown)} unknown (expected some of {', '.join(peer_names())})")
    if args.compare is not None and not Path(args.compare).is_file():
        p.error(f"--compare: no file at {args.compare}")  # before the run, not after it
    return args


def main(argv=None) -> int:
    """Run the benchmark (see the module docstring); returns the exit status: 1 if any
    backend was WRONG or failed, else 0."""
    args = parse_args(argv)
    if not torch.cuda.is_available():
        return run_portable_smoke()

    from . import timing

    allocator_conf = timing.configure_allocator()
    workload = load_workload(args.workload)
    if args.quick:
        args.models = args.models or [next(iter(workload["models"]))]
        args.kv_dtypes = args.kv_dtypes or QUICK["kv_dtypes"]
        args.num_seqs = args.num_seqs or QUICK["num_seqs"]
        args.ctx = args.ctx or QUICK["ctx"]
    cases = enumerate_cases(
        workload, models=args.models, kv_dtypes=args.kv_dtypes, num_seqs=args.num_seqs, ctx=args.ctx
    )
    if not cases:
        print("no case of the workload passes the filters", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    backends = args.backends or default_backends(device)
    known = ("auto",) + BACKEND_NAMES
    unknown = [b for b in backends if b not in known]
    if unknown:
        print(f"--backends: {', '.join(unknown)} unknown (expected some of {', '.join(known)})", file=sys.stderr)
        return 2

    peers = []
    if args.peers is not None:
        usable, skipped = available_peers(device)
        peers = [p for p in usable if not args.peers or p.name in args.peers]
        for name, reason in skipped.items():
            if not args.peers or name in args.peers:
                print(f"peer {name} skipped: {reason}")

    bandwidth_by_config = timing.read_bandwidth_by_config(device, int(args.bandwidth_gb * (1 << 30)))
    read_bandwidth = max(bandwidth_by_config.values())
    gpu = torch.cuda.get_device_name(device)
    table, _ = policy_for(device.type, device.index)
    dispatch_table = table.source if table is not None else None
    expandable = timing.expandable_segments_in_use()
    print(
        f"{gpu}: read bandwidth {read_bandwidth / 1e12:.3f} TB/s "
        f"(best streaming-read kernel over {args.bandwidth_gb:g} GiB); "
        f"auto dispatches by {dispatch_table or 'the fallback rule (no dispatch table for this GPU)'}; "
        f"allocator {allocator_conf!r} (expandable segments: {expandable})"
    )
    print(f"{len(cases)} cases x backends {', '.join(backends)}"
          + (f" and peers {', '.join(p.name for p in peers)}" if peers else "")
          + (f", each beside a streaming read of its floor bytes ('{READ}')" if args.read_ceiling else "")
          + f"; timing: {args.timing}, median of {args.samples}")  # fmt: skip

    timer = timing.InterleavedTimer(graphs=args.timing == "graph", samples=args.samples, warmup=args.warmup)

    try:
        from tqdm import tqdm

        bar = tqdm(total=len(cases), unit="case", file=sys.stderr)
        emit = bar.write
    except ImportError:
        bar, emit = None, print
    emit(format_table_header())
    results = []
    for spec in cases:
        if bar is not None:
            bar.set_description(spec.label)
        case_results = run_case(spec, backends, device, read_bandwidth, timer, peers, args.read_ceiling)
        add_relative_figures(case_results)
        for r in case_results:
            emit(format_table_row(r))
        results += case_results
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()

    refusals = {}
    for r in results:
        if r.reason is not None:
            refusals.setdefault((r.backend, r.status), (r.reason, []))[1].append(r)
    for (backend, status), (reason, rows) in refusals.items():
        print(f"{backend} {status} on {len(rows)} case(s), e.g. {rows[0].model} {rows[0].kv} "
              f"num_seqs={rows[0].num_seqs} ctx={rows[0].ctx}: {reason}")  # fmt: skip
    regret = regret_summary(results)
    if regret is not None:
        print(regret)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "decode-" + time.strftime("%Y%m%d-%H%M%S")
    import triton

    meta = dict(
        gpu=gpu,
        sm_count=torch.cuda.get_device_properties(device).multi_processor_count,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        hip=torch.version.hip,  # a ROCm build of torch: cuda is None
        triton=triton.__version__,
        python=platform.python_version(),
        git_commit=git_commit(),
        command=command_line(),
        arguments=vars(args),
        workload=str(Path(args.workload) if args.workload else DEFAULT_WORKLOAD),
        timing=dict(method=args.timing, samples=args.samples, warmup=args.warmup, flush_bytes=timing.FLUSH_BYTES),
        read_bandwidth_bytes_per_s=read_bandwidth,
        allocator=dict(conf=allocator_conf, expandable_segments=expandable),
        dispatch_table=dispatch_table,
        read_bandwidth_by_config=bandwidth_by_config,
        tolerance=dict(kv_16bit=TOLERANCE_16BIT, kv_8bit=TOLERANCE_8BIT, checked_sequences=CHECKED_SEQUENCES,
                       peers_fp8_compute=TOLERANCE_FP8_COMPUTE),
        peers={p.name: type(p).__module__ for p in peers},
        peer_libraries=library_versions(peers),
    )
    write_csv(results, out_dir / f"{stem}.csv")
    write_json(results, meta, out_dir / f"{stem}.json")
    plots = plot_results(results, out_dir, stem)
    print(f"wrote {out_dir / stem}.csv, .json and {len(plots)} plot(s)")
    if peers:
        report_against_live_peers(results, [p.name for p in peers], gpu, out_dir, stem)
    if args.compare:
        from .compare import report_against_peers

        try:
            print("\n" + report_against_peers([asdict(r) for r in results], args.compare, our_gpu_name=gpu))
        except ValueError as e:
            print(f"--compare: {e}", file=sys.stderr)
    return 1 if any(r.status in (WRONG, ERROR) for r in results) else 0
