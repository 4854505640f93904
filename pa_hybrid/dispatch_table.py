"""Measured dispatch tables: which backend is fastest where, per GPU model.

``python -m pa_hybrid.tune`` times every backend on a grid of calls and writes one
table (JSON) per GPU model; the dispatcher orders its candidates by the table of
the current GPU and falls back to :class:`~pa_hybrid.dispatch.DispatchRules`
where no table applies. Shipped tables live in ``pa_hybrid/tables/``.

A table holds groups keyed by (KV class, query rows per kv head, head size): the rows
are GQA x max_qlen, the M dim of the kernels' tiles (decode calls: the GQA ratio). Each
group holds measured points (``pairs`` = concurrency x num_kv_heads, ``ctx`` = the
longest context) with the backends ranked fastest first. A call reads the group of its
KV class and head size with the fewest measured rows at least its own (rows round up,
as the kernels' tiles do; none: the rule decides), then the point nearest to it: first the
measured ``pairs`` value nearest on a log scale, then, among that row's points,
the nearest ``ctx``; a tie goes to the larger value. The regions of the table are
therefore the cells around measured points, with borders at geometric midpoints.

The context length a call is judged by is its ``max_seq_len``: the only length
the host knows without reading device memory. Callers that pass the batch's true
longest context get the choice measured for it.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .call import CallKey

TABLE_FORMAT = 2
"""Version of the JSON layout; a table of another version is refused when loaded, except
format 1, whose groups were keyed by GQA (tuned on decode calls: the same as their rows)."""

TABLE_DIR = Path(__file__).resolve().parent / "tables"
"""The tables shipped with the package (one JSON per measured GPU model)."""

TABLE_ENV = "PA_HYBRID_DISPATCH_TABLE"
"""A user table (a JSON file, or a directory of them) considered before the shipped ones."""

KV_CLASSES = ("16bit", "fp8", "int8")


def kv_class(kv_dtype: torch.dtype) -> str:
    """The table's KV key: 16-bit caches (bf16 and fp16 stream the same bytes) share one."""
    if kv_dtype in (torch.bfloat16, torch.float16):
        return "16bit"
    if kv_dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
        return "fp8"
    if kv_dtype == torch.int8:
        return "int8"
    raise ValueError(f"kv_dtype: expected bf16, fp16, fp8 e4m3 or int8, got {kv_dtype}")


def key_pairs(key: CallKey) -> int:
    """(sequence, kv head) pairs of a call: the CTAs a single-pass kernel launches."""
    return key.concurrency * key.num_kv_heads


def key_rows(key: CallKey) -> int:
    """Query rows per kv head of a call: GQA x max_qlen."""
    return key.gqa * key.max_qlen


@dataclass(frozen=True)
class TablePoint:
    """One measured point: backends fastest first, with their (geometric-mean) times."""

    pairs: int
    ctx: int
    order: tuple
    us: tuple  # microseconds of each backend in ``order``
    cases: int = 1  # how many benchmark cases were merged into this point

    def describe(self) -> str:
        times = ", ".join(f"{b} {t:.1f} us" for b, t in zip(self.order, self.us))
        return f"pairs={self.pairs} ctx={self.ctx} ({times})"


def _nearest(values, target: int) -> int:
    """The value nearest ``target`` on a log scale; a tie goes to the larger value."""
    t = math.log(max(target, 1))
    return min(values, key=lambda v: (abs(math.log(v) - t), -v))


@dataclass(frozen=True)
class TableGroup:
    """The points of one (KV class, query rows per kv head, head size)."""

    kv: str
    rows: int
    head_size: int
    points: tuple

    def nearest(self, pairs: int, ctx: int) -> TablePoint:
        """The point whose cell holds (pairs, ctx): nearest pairs row, then nearest ctx in it."""
        row_pairs = _nearest({p.pairs for p in self.points}, pairs)
        row = [p for p in self.points if p.pairs == row_pairs]
        row_ctx = _nearest({p.ctx for p in row}, ctx)
        return next(p for p in row if p.ctx == row_ctx)

    def describe(self) -> str:
        return f"kv={self.kv} rows<={self.rows} head_size={self.head_size}"


@dataclass(frozen=True)
class TableRow:
    """What decided a call: the table, its group and the point."""

    table: "DispatchTable"
    group: TableGroup
    point: TablePoint

    def describe(self) -> str:
        return f"table {self.table.source}{self.table.when_measured()}: {self.group.describe()}, nearest point {self.point.describe()}"


@dataclass(frozen=True)
class DispatchTable:
    gpu: str  # torch.cuda.get_device_name
    compute_capability: tuple  # (major, minor)
    groups: tuple
    measured: dict = field(default_factory=dict)  # provenance: date, commit, command, versions, bandwidth
    source: str = "<memory>"  # where it was loaded from

    def when_measured(self) -> str:
        """`` (measured DATE at COMMIT)``, as far as the provenance says: a table measured
        before the kernels last changed may no longer rank them right."""
        date, commit = self.measured.get("date"), self.measured.get("git_commit")
        parts = [f for f in (date, commit and f"at {commit}") if f]
        return f" (measured {' '.join(parts)})" if parts else ""

    def matches(self, gpu: str, compute_capability) -> bool:
        return self.gpu == gpu and tuple(self.compute_capability) == tuple(compute_capability)

    def group_for(self, key: CallKey) -> TableGroup | None:
        """The group of the key's KV class and head size with the fewest query rows >= the key's."""
        try:
            kv = kv_class(key.kv_dtype)
        except ValueError:
            return None
        rows = key_rows(key)
        fits = [g for g in self.groups if g.kv == kv and g.head_size == key.head_size and g.rows >= rows]
        return min(fits, key=lambda g: g.rows, default=None)

    def lookup(self, key: CallKey) -> TableRow | None:
        """The row that orders the backends for this call, or None where the table is silent."""
        group = self.group_for(key)
        if group is None:
            return None
        return TableRow(self, group, group.nearest(key_pairs(key), key.max_seq_len))

    # ------------------------------------------------------------------ JSON

    def to_json(self) -> dict:
        return dict(
            format=TABLE_FORMAT,
            gpu=self.gpu,
            compute_capability=list(self.compute_capability),
            measured=self.measured,
            groups=[
                dict(
                    kv=g.kv,
                    rows=g.rows,
                    head_size=g.head_size,
                    points=[dict(asdict(p), order=list(p.order), us=list(p.us)) for p in g.points],
                )
                for g in self.groups
            ],
        )

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path

    @classmethod
    def from_json(cls, data: dict, source: str = "<memory>") -> "DispatchTable":
        if data.get("format") not in (1, TABLE_FORMAT):
            raise ValueError(f"dispatch table {source}: format {data.get('format')!r}, expected {TABLE_FORMAT}")
        rows_field = "gqa" if data["format"] == 1 else "rows"
        try:
            groups = []
            for g in data["groups"]:
                if g["kv"] not in KV_CLASSES:
                    raise ValueError(f"kv {g['kv']!r} is not one of {KV_CLASSES}")
                points = tuple(
                    TablePoint(int(p["pairs"]), int(p["ctx"]), tuple(p["order"]), tuple(map(float, p["us"])), int(p.get("cases", 1)))
                    for p in g["points"]
                )
                if not points or any(p.pairs < 1 or p.ctx < 1 or not p.order or len(p.order) != len(p.us) for p in points):
                    raise ValueError(f"group {g['kv']} rows {g[rows_field]}: points need pairs, ctx >= 1 and one time per backend")
                groups.append(TableGroup(g["kv"], int(g[rows_field]), int(g["head_size"]), points))
            return cls(data["gpu"], tuple(data["compute_capability"]), tuple(groups), data.get("measured", {}), source)
        except (KeyError, TypeError) as e:
            raise ValueError(f"dispatch table {source}: missing or malformed field ({type(e).__name__}: {e})") from None

    @classmethod
    def load(cls, path) -> "DispatchTable":
        path = Path(path)
        return cls.from_json(json.loads(path.read_text()), source=str(path))


# ---------------------------------------------------------------------- finding tables


def _tables_in(path: Path) -> list:
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    return [DispatchTable.load(f) for f in files]


def candidate_tables(user_tables=()) -> list:
    """Tables in the order they are tried: ``user_tables`` (set by the API), the file or
    directory in ``$PA_HYBRID_DISPATCH_TABLE``, then the shipped ones."""
    tables = list(user_tables)
    env = os.environ.get(TABLE_ENV)
    if env:
        path = Path(env)
        if not path.exists():
            raise ValueError(f"{TABLE_ENV}: no file or directory at {env}")
        tables += _tables_in(path)
    if TABLE_DIR.is_dir():
        tables += _tables_in(TABLE_DIR)
    return tables


def table_for(gpu: str, compute_capability, user_tables=()) -> DispatchTable | None:
    """The first table measured on this GPU model (same name and compute capability)."""
    return next((t for t in candidate_tables(user_tables) if t.matches(gpu, compute_capability)), None)


# ---------------------------------------------------------------------- building tables


def build_table(measurements, gpu: str, compute_capability, measured: dict | None = None) -> DispatchTable:
    """A table from measurements: ``(CallKey, {backend: microseconds})`` per timed case.

    Cases that land on the same point (same KV class, query rows, head size, pairs and
    longest context: two models can share one) are merged: backends timed in every
    one of them are ranked by the geometric mean of their time over the case's best,
    and reported with their geometric-mean time; the others follow, slowest last.
    """
    by_point = defaultdict(list)
    for key, times in measurements:
        times = {b: t for b, t in times.items() if t is not None and t > 0}
        if times:
            by_point[(kv_class(key.kv_dtype), key_rows(key), key.head_size, key_pairs(key), key.max_seq_len)].append(times)
    groups = defaultdict(list)
    for (kv, rows, head_size, pairs, ctx), cases in by_point.items():
        groups[(kv, rows, head_size)].append(_merge_point(pairs, ctx, cases))
    return DispatchTable(
        gpu=gpu,
        compute_capability=tuple(compute_capability),
        groups=tuple(
            TableGroup(kv, rows, hs, tuple(sorted(points, key=lambda p: (p.pairs, p.ctx))))
            for (kv, rows, hs), points in sorted(groups.items(), key=lambda item: (KV_CLASSES.index(item[0][0]), item[0][1:]))
        ),
        measured=dict(measured or {}),
    )


def merge_tables(base: DispatchTable, new: DispatchTable) -> DispatchTable:
    """``new`` with the groups of ``base`` (the same GPU model) that it did not measure: a
    tuning run of other shapes added to a table. ``base``'s provenance is kept under
    ``measured["earlier"]``."""
    if not base.matches(new.gpu, new.compute_capability):
        raise ValueError(f"{base.source} was measured on {base.gpu}, not {new.gpu}: tables of one GPU model only")
    ids = {(g.kv, g.rows, g.head_size) for g in new.groups}
    kept = [g for g in base.groups if (g.kv, g.rows, g.head_size) not in ids]
    groups = sorted(kept + list(new.groups), key=lambda g: (KV_CLASSES.index(g.kv), g.rows, g.head_size))
    base_run = {k: v for k, v in base.measured.items() if k != "earlier"}
    earlier = [base_run, *base.measured.get("earlier", [])]
    return DispatchTable(new.gpu, new.compute_capability, tuple(groups), dict(new.measured, earlier=earlier))


def _geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _merge_point(pairs: int, ctx: int, cases: list) -> TablePoint:
    everywhere = set.intersection(*(set(c) for c in cases))
    relative = {b: _geomean(c[b] / min(c.values()) for c in cases) for b in everywhere}
    ranked = sorted(everywhere, key=lambda b: (relative[b], b))
    partial = sorted(set().union(*cases) - everywhere, key=lambda b: (_geomean(c[b] for c in cases if b in c), b))
    order = ranked + partial
    us = [round(_geomean(c[b] for c in cases if b in c), 2) for b in order]  # 10 ns: well below the noise
    return TablePoint(pairs, ctx, tuple(order), tuple(us), len(cases))


def format_table(table: DispatchTable) -> str:
    """Each group as a grid: a row per measured ``pairs``, a column per ``ctx``, the winner
    and its lead over the runner-up (``asm 1.31`` = the next backend takes 1.31x as long)."""
    lines = [f"dispatch table for {table.gpu} (sm_{''.join(map(str, table.compute_capability))})"]
    for g in table.groups:
        contexts = sorted({p.ctx for p in g.points})
        cells = {(p.pairs, p.ctx): p for p in g.points}
        lines.append(f"\n{g.describe()}")
        lines.append("   pairs " + "".join(f"{c:>14}" for c in contexts))
        for pairs in sorted({p.pairs for p in g.points}):
            row = []
            for c in contexts:
                p = cells.get((pairs, c))
                if p is None:
                    row.append(f"{'.':>14}")
                else:
                    lead = f" {p.us[1] / p.us[0]:.2f}" if len(p.us) > 1 else ""
                    row.append(f"{p.order[0] + lead:>14}")
            lines.append(f"{pairs:>8} " + "".join(row))
    return "\n".join(lines)
