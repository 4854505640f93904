"""Our decode benchmark against the recorded bar of peer kernels.

    python -m pa_hybrid.bench.compare bench_out/decode-....csv --peers ../shared/bench/peers-h100.csv
        [--gpu NAME] [--peers-gpu NAME] [--backend auto] [--plot DIR] [--markdown]

The bar (``peers-h100.csv``, described in ``PEERS.md`` beside it) holds, per case of
the grid, the time of the fastest of several peer kernels. Each case timed by one of
our backends (default "auto") is set against it: speedup = peer time / our time (above
1 we are faster), summarised as geometric means per model and KV dtype and per KV
dtype and size class (those of ``summary.py``), with the cases where a peer is faster
and the worst one. Our "% of floor" uses our own floor: the peers' floor comes from
the bandwidth measured in their run, so the two percentages are not comparable.

Times only compare on the same GPU model: the peers' GPU (``--peers-gpu``, else the
file name) is checked against ours (``--gpu``, else the JSON written beside our CSV,
else our file name), and a mismatch is flagged at the top and bottom of the report.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .decode import MIXED, OK
from .summary import SIZE_CLASSES, geomean, size_class

OUR_COLUMNS = ("model", "kv", "num_seqs", "ctx", "mbytes", "floor_us", "backend", "status", "us")
PEER_COLUMNS = ("model", "kv", "num_seqs", "ctx", "mbytes", "best_peer", "best_peer_us")
"""Columns each CSV must have (others are ignored)."""

CLASS_ORDER = [name for name, _, _ in SIZE_CLASSES] + [MIXED]

LISTED_ONE_SIDED = 8
"""One-sided cases named per reason at most (a filtered run leaves most of the bar unmatched)."""


# --------------------------------------------------------------------------- #
# Joining our rows with the peers'
# --------------------------------------------------------------------------- #


def case_key(row: dict) -> tuple:
    """``(model, kv, num_seqs, ctx)`` of a row of either CSV. The mixed case is one per
    model and dtype and the peers write "mixed" for its num_seqs (we write the batch
    size), so its num_seqs is left out (None)."""
    ctx = str(row["ctx"])
    return (row["model"], row["kv"], None if ctx == MIXED else int(row["num_seqs"]), ctx)


def case_label(key: tuple) -> str:
    model, kv, num_seqs, ctx = key
    return f"{model} {kv} " + ("mixed lengths" if num_seqs is None else f"num_seqs={num_seqs} ctx={ctx}")


@dataclass(frozen=True)
class CaseComparison:
    """One case timed on both sides."""

    model: str
    kv: str
    num_seqs: int  # ours (the peers write "mixed" for the mixed case)
    ctx: str
    mbytes: float  # ours: K+V bytes / 1e6
    size_class: str  # of summary.size_class
    our_us: float
    our_pct_of_floor: float  # against our floor
    peer: str
    peer_us: float
    peer_mbytes: float  # the bytes of the peers' floor / 1e6, rounded to 0.1

    @property
    def same_work(self) -> bool:
        """False when the peers' floor bytes (K+V and more, rounded to 0.1 MB) fall short of
        our K+V bytes alone: their batch was not ours (e.g. mixed lengths drawn otherwise)."""
        return self.peer_mbytes + 0.05 >= self.mbytes

    @property
    def speedup(self) -> float:
        """Best peer's time over ours: above 1 we are faster."""
        return self.peer_us / self.our_us

    @property
    def label(self) -> str:
        return case_label(case_key(vars(self)))


@dataclass(frozen=True)
class OneSided:
    """Cases present on one side only, for one reason. ``whole_group``: the reason covers
    a whole KV dtype or model (e.g. no peer has int8), so the cases are counted, not listed."""

    side: str  # "ours" or "peers": where the cases are
    reason: str
    labels: tuple
    whole_group: bool = False


@dataclass(frozen=True)
class Comparison:
    backend: str
    cases: list  # of CaseComparison, in our CSV's order
    one_sided: list  # of OneSided


def compare(our_rows: list, peer_rows: list, backend: str = "auto") -> Comparison:
    """Join our rows of ``backend`` with the peer rows by :func:`case_key`. Our rows that
    were not timed (status other than "ok") leave their case one-sided. Values may be
    strings (a CSV) or numbers (the benchmark's results). Raises ValueError when there
    is no row of ``backend`` or no case on both sides."""
    ours = [r for r in our_rows if r["backend"] == backend]
    if not ours:
        present = sorted({r["backend"] for r in our_rows})
        raise ValueError(
            f"no row of backend {backend!r} in our results (backends there: {', '.join(present) or 'none'}; "
            "pick one with --backend)"
        )
    peers = {case_key(r): r for r in peer_rows}
    listed = {case_key(r): r for r in ours}
    timed = {key: r for key, r in listed.items() if r["status"] == OK}
    cases = [
        CaseComparison(
            model=r["model"],
            kv=r["kv"],
            num_seqs=int(r["num_seqs"]),
            ctx=str(r["ctx"]),
            mbytes=float(r["mbytes"]),
            size_class=size_class(r),
            our_us=float(r["us"]),
            our_pct_of_floor=100.0 * float(r["floor_us"]) / float(r["us"]),
            peer=peers[key]["best_peer"],
            peer_us=float(peers[key]["best_peer_us"]),
            peer_mbytes=float(peers[key]["mbytes"]),
        )
        for key, r in timed.items()
        if key in peers
    ]
    if not cases:
        raise ValueError(
            f"no case timed by {backend!r} is in the peers' file ({len(timed)} timed cases of ours, "
            f"{len(peers)} peer rows): do the two CSVs cover the same grid?"
        )
    groups = {}
    for key in listed:
        if key not in peers:
            groups.setdefault(("ours",) + _missing_reason(key, peers, "peer"), []).append(key)
    for key in peers:
        if key in listed and key not in timed:
            reason = (f"our {backend!r} did not time them (status {listed[key]['status']})", False)
        elif key not in listed:
            reason = _missing_reason(key, listed, f"{backend!r}")
        else:
            continue
        groups.setdefault(("peers",) + reason, []).append(key)
    one_sided = [
        OneSided(side, reason, tuple(case_label(k) for k in keys), whole)
        for (side, reason, whole), keys in groups.items()
    ]
    return Comparison(backend=backend, cases=cases, one_sided=one_sided)


def live_peer_rows(rows: list, peer_names) -> list:
    """The bar of a ``--peers`` run: for each case where a peer of ``peer_names`` was
    timed (status "ok"), the fastest one, as a row of the peers' CSV
    (:data:`PEER_COLUMNS` plus ``floor_us`` and ``best_peer_pct_of_floor``), in the
    order of the cases in ``rows`` (the benchmark's results as dicts)."""
    names = set(peer_names)
    best = {}
    for r in rows:
        if r["backend"] in names and r["status"] == OK:
            key = case_key(r)
            if key not in best or float(r["us"]) < float(best[key]["us"]):
                best[key] = r
    bar = []
    for r in best.values():
        floor_us = None if r["floor_us"] in (None, "") else float(r["floor_us"])
        bar.append(dict(
            model=r["model"], kv=r["kv"], num_seqs=r["num_seqs"], ctx=r["ctx"], mbytes=r["mbytes"],
            floor_us=floor_us, best_peer=r["backend"], best_peer_us=float(r["us"]),
            best_peer_pct_of_floor=None if floor_us is None else 100.0 * floor_us / float(r["us"]),
        ))  # fmt: skip
    return bar


def write_peer_rows(bar: list, path) -> None:
    """:func:`live_peer_rows` as a CSV with the columns of ``peers-h100.csv`` (readable
    by ``--compare`` and by ``python -m pa_hybrid.bench.compare --peers``)."""
    columns = ("model", "kv", "num_seqs", "ctx", "mbytes", "floor_us", "best_peer", "best_peer_us",
               "best_peer_pct_of_floor")  # fmt: skip
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in bar:
            writer.writerow({c: _csv_number(row[c]) for c in columns})


def _csv_number(value):
    return f"{value:.1f}" if isinstance(value, float) else ("" if value is None else value)


def _missing_reason(key: tuple, other_side: dict, other_name: str) -> tuple:
    """Why ``key`` has no row in ``other_side``: its whole KV dtype or model is absent
    there (said once for the group), or only the case is."""
    model, kv = key[:2]
    if kv not in {k[1] for k in other_side}:
        return f"no {other_name} row has kv {kv}", True
    if model not in {k[0] for k in other_side}:
        return f"no {other_name} row has model {model}", True
    return f"no {other_name} row for the case", False


# --------------------------------------------------------------------------- #
# Summaries
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class GroupSummary:
    group: tuple
    cases: int
    geomean_speedup: float
    slower: int  # cases where the best peer is faster than us
    worst: CaseComparison  # lowest speedup


def summarize(cases: list, key) -> list:
    """One :class:`GroupSummary` per value of ``key(case)``, in order of first appearance."""
    groups = {}
    for c in cases:
        groups.setdefault(key(c), []).append(c)
    return [
        GroupSummary(
            group=group,
            cases=len(members),
            geomean_speedup=geomean([c.speedup for c in members]),
            slower=sum(c.speedup < 1 for c in members),
            worst=min(members, key=lambda c: c.speedup),
        )
        for group, members in groups.items()
    ]


def by_model_and_kv(cases: list) -> list:
    return summarize(cases, lambda c: (c.model, c.kv))


def by_kv_and_size_class(cases: list) -> list:
    """Grouped by KV dtype then size class, classes from the largest calls to the mixed case."""
    kv_order = list(dict.fromkeys(c.kv for c in cases))
    groups = summarize(cases, lambda c: (c.kv, c.size_class))
    return sorted(groups, key=lambda s: (kv_order.index(s.group[0]), CLASS_ORDER.index(s.group[1])))


def overall(cases: list) -> GroupSummary:
    return summarize(cases, lambda c: ("all",))[0]


# --------------------------------------------------------------------------- #
# The GPU check
# --------------------------------------------------------------------------- #

GPU_TOKEN = re.compile(r"[a-z]+\d+[a-z]*", re.IGNORECASE)
"""A GPU model as file names carry it (h100, h200, mi300x): letters then digits."""


def gpu_from_file_name(path) -> str | None:
    """The GPU model named by the last ``-``/``_`` part of the file name, upper case
    (``peers-h100.csv`` -> "H100", ``decode-12f63d0-h200.csv`` -> "H200"); None if
    that part is no GPU name (``decode-20250101-120000.csv``)."""
    last = re.split(r"[-_]", Path(path).stem)[-1]
    return last.upper() if GPU_TOKEN.fullmatch(last) else None


def peers_gpu(path, given: str | None = None) -> tuple:
    """``(name, where it came from)`` of the peers' GPU: ``given``, else the file name."""
    if given:
        return given, "--peers-gpu"
    name = gpu_from_file_name(path)
    return name, "the file name" if name else None


def our_gpu(path, given: str | None = None) -> tuple:
    """``(name, where it came from)`` of our GPU: ``given``, else the "gpu" field of the
    JSON the benchmark wrote beside the CSV, else the file name."""
    if given:
        return given, "--gpu"
    meta_path = Path(path).with_suffix(".json")
    if meta_path.is_file():
        try:
            name = json.loads(meta_path.read_text()).get("gpu")
        except json.JSONDecodeError as e:
            raise ValueError(f"OURS.csv: {meta_path} beside it is not JSON ({e}); pass --gpu") from e
        if name:
            return name, meta_path.name
    name = gpu_from_file_name(path)
    return name, "the file name" if name else None


def gpu_names_match(a: str, b: str) -> bool:
    """One name contains the other, ignoring case: "H100" matches "NVIDIA H100 80GB HBM3"."""
    return a.lower() in b.lower() or b.lower() in a.lower()


@dataclass(frozen=True)
class GpuCheck:
    """Our GPU and the peers' (None: unknown), each with where the name came from."""

    ours: str | None = None
    ours_from: str | None = None
    peers: str | None = None
    peers_from: str | None = None

    @property
    def verdict(self) -> str:
        """One of "same", "different", "unknown" (either name missing)."""
        if not self.ours or not self.peers:
            return "unknown"
        return "same" if gpu_names_match(self.ours, self.peers) else "different"

    def _name(self, side: str) -> str:
        name, where = (self.ours, self.ours_from) if side == "ours" else (self.peers, self.peers_from)
        return "unknown" if not name else name + (f" (from {where})" if where else "")

    def lines(self, markdown: bool) -> list:
        """The check as report lines: a loud block when the GPUs differ."""
        names = f"ours {self._name('ours')}, peers {self._name('peers')}"
        if self.verdict == "same":
            return [f"GPU: {names}: the same GPU model."]
        if self.verdict == "unknown":
            text = (f"GPU: {names}: could not be checked (pass --gpu / --peers-gpu); "
                    "the speedups mean something only if both ran on the same GPU model.")  # fmt: skip
            return [f"> **{text}**" if markdown else text]
        text = [
            f"WARNING: DIFFERENT GPUs: {names}.",
            "This compares runs on different GPUs: the speedups are NOT meaningful as such.",
        ]
        if markdown:
            return ["> **" + " ".join(text) + "**"]
        bar = "!" * 100
        return [bar] + [f"!!! {line}" for line in text] + [bar]


# --------------------------------------------------------------------------- #
# The report
# --------------------------------------------------------------------------- #


def render_table(headers: list, rows: list, markdown: bool) -> str:
    """A markdown table, or plain columns aligned right (the first column left)."""
    if markdown:
        return "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
                         + ["| " + " | ".join(row) + " |" for row in rows])  # fmt: skip
    widths = [max(map(len, column)) for column in zip(headers, *rows)]
    align = lambda row: "  ".join(  # noqa: E731
        cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))
    )
    return "\n".join(align(row).rstrip() for row in [headers] + rows)


def _worst_text(c: CaseComparison) -> str:
    return f"{c.speedup:.2f}x ({c.model} {c.num_seqs}x{c.ctx}: ours {c.our_us:.1f} us, {c.peer} {c.peer_us:.1f} us)"


def _summary_rows(summaries: list) -> list:
    return [
        [*s.group, str(s.cases), f"{s.geomean_speedup:.3f}", str(s.slower), _worst_text(s.worst)]
        for s in summaries
    ]


def format_report(comparison: Comparison, gpus: GpuCheck, markdown: bool = False) -> str:
    """The whole report: GPU check, overall figures, the two summary tables, every case,
    the one-sided cases, and the GPU warning again at the bottom when the GPUs differ."""
    cases = comparison.cases
    total = overall(cases)
    worst = total.worst
    heading = (lambda text: f"### {text}") if markdown else (lambda text: f"== {text}")
    out = gpus.lines(markdown) + [""]
    out += [
        f"{comparison.backend} against the best peer per case, {total.cases} cases: geomean speedup "
        f"{total.geomean_speedup:.3f} (peer time / ours, above 1 we are faster); slower than the best peer "
        f"on {total.slower}; worst {worst.label}: {worst.our_us:.1f} us ({worst.our_pct_of_floor:.1f}% of our floor) "
        f"vs {worst.peer} {worst.peer_us:.1f} us, speedup {worst.speedup:.3f}.",
        "",
        heading("By model and KV dtype"),
        "",
        render_table(["model", "kv", "cases", "geomean speedup", "slower", "worst (case)"],
                     _summary_rows(by_model_and_kv(cases)), markdown),  # fmt: skip
        "",
        heading("By KV dtype and size of K+V"),
        "",
        render_table(["kv", "class", "cases", "geomean speedup", "slower", "worst (case)"],
                     _summary_rows(by_kv_and_size_class(cases)), markdown),  # fmt: skip
        "",
        heading("Every case"),
        "",
        render_table(
            ["model", "kv", "seqs", "ctx", "MB", "ours us", "ours % floor", "best peer", "peer us", "speedup"],
            [
                [c.model, c.kv, str(c.num_seqs), c.ctx, f"{c.mbytes:.1f}", f"{c.our_us:.1f}",
                 f"{c.our_pct_of_floor:.1f}", c.peer, f"{c.peer_us:.1f}", f"{c.speedup:.2f}"]
                for c in cases
            ],
            markdown,
        ),  # fmt: skip
    ]
    other_work = [c for c in cases if not c.same_work]
    if other_work:
        bullet = "- " if markdown else "  "
        out += ["", heading("Cases where the peers timed other work"), ""]
        out.append(
            f"{len(other_work)} case(s) where the peers' floor bytes fall below our K+V bytes alone: their batch held "
            "fewer tokens than ours (other context lengths), so these speedups compare different work (they stay in "
            "the figures above):"
        )
        out += [f"{bullet}{c.label}: ours {c.mbytes:.1f} MB of K+V, theirs {c.peer_mbytes:.1f} MB" for c in other_work]
    if comparison.one_sided:
        out += ["", heading("Cases on one side only"), ""]
        for group in comparison.one_sided:
            where = f"our {comparison.backend!r} results" if group.side == "ours" else "the peers' file"
            line = f"{len(group.labels)} case(s) only in {where}: {group.reason}"
            if not group.whole_group:
                more = len(group.labels) - LISTED_ONE_SIDED
                line += ": " + "; ".join(group.labels[:LISTED_ONE_SIDED]) + (f"; and {more} more" if more > 0 else "")
            out.append(("- " if markdown else "") + line + ".")
    if gpus.verdict != "same":
        out += [""] + gpus.lines(markdown)
    return "\n".join(out)


def load_csv(path, required: tuple, argument: str) -> list:
    """The rows of the CSV at ``path`` as dicts; ValueError naming ``argument`` if the
    file is missing or lacks one of the ``required`` columns."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{argument}: no file at {path}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{argument}: {path} lacks the column(s) {', '.join(missing)}")
        return list(reader)


def report_against_peers(our_rows: list, peers_path, *, our_gpu_name: str | None, backend: str = "auto") -> str:
    """The plain-text report of ``our_rows`` (the benchmark's results as dicts, run on
    ``our_gpu_name``) against the peers' CSV: what ``python -m pa_hybrid.bench
    --compare`` prints. Raises ValueError as :func:`compare`."""
    peer_rows = load_csv(peers_path, PEER_COLUMNS, "--compare")
    gpus = GpuCheck(our_gpu_name, "this run", *peers_gpu(peers_path))
    return format_report(compare(our_rows, peer_rows, backend), gpus)


# --------------------------------------------------------------------------- #
# The plot
# --------------------------------------------------------------------------- #


def plot_speedups(cases: list, path, title: str = "") -> Path | None:
    """A heat map of the speedup over the best peer: one panel per (model, kv), num_seqs
    down, context length across (the mixed case its own column), each cell annotated;
    red where a peer is faster, blue where we are, white at 1.0, with the same scale in
    every panel. Returns the path written, or None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
        from matplotlib.colors import TwoSlopeNorm
    except ImportError:
        return None
    models = list(dict.fromkeys(c.model for c in cases))
    kvs = list(dict.fromkeys(c.kv for c in cases))
    speedups = [c.speedup for c in cases]
    spread = max(max(speedups), 1 / min(speedups), 1.05)  # 1/x and x equally far from the centre
    norm = TwoSlopeNorm(vmin=1 / spread, vcenter=1.0, vmax=spread)
    cmap = plt.get_cmap("RdBu").with_extremes(bad="#dddddd")  # grey: no case there
    fig, axes = plt.subplots(
        len(models), len(kvs), figsize=(4.5 * len(kvs), 3.8 * len(models)), squeeze=False, layout="constrained"
    )
    for row, model in enumerate(models):
        for col, kv in enumerate(kvs):
            ax = axes[row][col]
            panel = [c for c in cases if c.model == model and c.kv == kv]
            seqs = sorted({c.num_seqs for c in panel})
            contexts = sorted({c.ctx for c in panel}, key=lambda x: (x == MIXED, 0 if x == MIXED else int(x)))
            grid = np.full((len(seqs), len(contexts)), np.nan)
            for c in panel:
                grid[seqs.index(c.num_seqs), contexts.index(c.ctx)] = c.speedup
            image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto")
            for (i, j), value in np.ndenumerate(grid):
                if not np.isnan(value):
                    color = "white" if abs(norm(value) - 0.5) > 0.3 else "black"  # white on deep red and blue
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8, color=color)
            ax.set_xticks(range(len(contexts)), contexts)
            ax.set_yticks(range(len(seqs)), [str(n) for n in seqs])
            ax.set_xlabel("context length")
            ax.set_ylabel("num_seqs")
            ax.set_title(f"{model}, {kv}")
    fig.colorbar(image, ax=axes, label="speedup over the best peer (>1: we are faster)")
    fig.suptitle(title or "speedup over the best peer")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pa_hybrid.bench.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("ours", metavar="OURS.csv", help="a CSV of python -m pa_hybrid.bench")
    p.add_argument("--peers", required=True, metavar="PEERS.csv", help="the bar, e.g. ../shared/bench/peers-h100.csv")
    p.add_argument("--gpu", help="our GPU (default: the JSON beside OURS.csv, else its file name)")
    p.add_argument("--peers-gpu", help="the peers' GPU (default: from the file name, peers-h100.csv -> H100)")
    p.add_argument("--backend", default="auto", help="our backend to compare (default auto)")
    p.add_argument("--plot", metavar="DIR", help="write a heat map of the speedups to DIR")
    p.add_argument("--markdown", action="store_true", help="markdown tables (for benchmarks/RESULTS.md)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Print the report; 0, or 2 with the reason on stderr when an input is unusable."""
    args = parse_args(argv)
    try:
        our_rows = load_csv(args.ours, OUR_COLUMNS, "OURS.csv")
        peer_rows = load_csv(args.peers, PEER_COLUMNS, "--peers")
        comparison = compare(our_rows, peer_rows, args.backend)
        gpus = GpuCheck(*our_gpu(args.ours, args.gpu), *peers_gpu(args.peers, args.peers_gpu))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(comparison, gpus, args.markdown))
    if args.plot:
        stem = f"{Path(args.ours).stem}-vs-{Path(args.peers).stem}"
        written = plot_speedups(comparison.cases, Path(args.plot) / f"{stem}.png", title=stem)
        print(f"\nwrote {written}" if written else "\n--plot: matplotlib is not installed; no plot written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
