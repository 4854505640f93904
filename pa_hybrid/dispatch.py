"""Which backend runs a call: the selection policy and its data tables.

Backends register themselves (``register``); the dispatcher only sees their
``available(device)``, ``supports(key)`` and ``run(call)``. The policy orders the
candidates from the measured dispatch table of the current GPU model
(:mod:`pa_hybrid.dispatch_table`, written by ``python -m pa_hybrid.tune``) and,
where no table applies, from the rule of :class:`DispatchRules`; ``supports`` and
``available`` filter them, and every skipped backend keeps its reason, which
``explain`` reports with the table row that decided. Tables are found once per
device and choices are cached per :class:`~pa_hybrid.call.CallKey`, so a
steady-state call pays one dict lookup: no file I/O, no device query.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from .call import CallKey
from .dispatch_table import DispatchTable, TableRow, table_for

BACKEND_NAMES = ("hip", "asm", "triton", "torch")
"""Every backend name the policy knows, fastest-first in general."""


@dataclass(frozen=True)
class DispatchRules:
    """The thresholds of the selection policy for one GPU model.

    The single-pass kernel runs one CTA per (sequence, kv head): it wins once those pairs
    (``concurrency x num_kv_heads``, whatever max_qlen: a sequence's new tokens share its CTAs)
    give the GPU enough CTAs, and split-KV kernels win below. Defaults measured on the
    H100 over the whole benchmark grid (benchmarks/RESULTS.md, section 9): from 64 pairs
    asm beat hip on every bf16 case, at 32 or fewer it mostly lost; on 8-bit caches
    asm beat Triton everywhere from 128 pairs, but not at 64 (int8, long contexts).
    Used where no measured dispatch table covers the call."""

    single_pass_from_pairs: int = 64
    """16-bit KV: the single-pass "asm" kernel from this many (sequence, kv head) pairs,
    the split-KV "hip" kernel below."""

    single_pass_8bit_from_pairs: int = 128
    """fp8/int8 KV: "asm" from this many pairs, the split-KV "hip" kernel below."""

    large_group_hip_below_pairs: int = 16
    """Groups of more than :data:`LARGE_GROUP_ROWS` query rows per kv head: "hip" (a CTA per
    block of rows, each reading the kv head's K and V) below this many pairs, "triton" (one
    program per 64 rows) from it. Measured on the H100 over 64-row calls (RESULTS.md section
    50): below 16 pairs hip took 0.77-1.01x Triton's time (geomean 0.86), from 16 pairs 0.87-1.20x (1.03)."""


LARGE_GROUP_ROWS = 32
"""Query rows per kv head (GQA x max_qlen) that one CTA of the asm and hip kernels holds at most."""


RULES_BY_DEVICE: dict[str, DispatchRules] = {"default": DispatchRules()}
"""Per-GPU rules keyed by ``torch.cuda.get_device_name``; "default" elsewhere."""


@dataclass
class Selection:
    """The outcome of selection: the backend that runs and why the others did not."""

    backend: str
    rule: str
    skipped: dict = field(default_factory=dict)  # name -> reason, in preference order
    table_row: TableRow | None = None  # the dispatch-table row that ordered the candidates, if any

    def __str__(self):
        lines = [f"backend: {self.backend} ({self.rule})"]
        if self.table_row is not None:
            lines.append(f"  decided by {self.table_row.describe()}")
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


_REGISTRY: dict = {}
_USER_TABLES: list = []


def _policy_changed() -> None:
    policy_for.cache_clear()
    select.cache_clear()


def set_rules(device_name: str, rules: DispatchRules) -> None:
    """Install the fallback rules for a GPU model ("default" for every other device)."""
    RULES_BY_DEVICE[device_name] = rules
    _policy_changed()


def set_table(table: DispatchTable | str | None) -> None:
    """Use a measured dispatch table (a :class:`DispatchTable` or the path of its JSON)
    on the GPU model it was measured on, before ``$PA_HYBRID_DISPATCH_TABLE`` and the
    shipped tables; ``None`` removes every table set this way."""
    if table is None:
        _USER_TABLES.clear()
    else:
        _USER_TABLES.insert(0, table if isinstance(table, DispatchTable) else DispatchTable.load(table))
    _policy_changed()


def register(backend) -> None:
    """Make a backend (an object with ``name``, ``available``, ``supports``, ``run``) selectable."""
    _REGISTRY[backend.name] = backend
    select.cache_clear()
    unavailable_reason.cache_clear()


def registered() -> dict:
    return dict(_REGISTRY)


@functools.lru_cache(maxsize=4096)
def unavailable_reason(name: str, key: CallKey) -> str | None:
    """Why backend ``name`` cannot run this call (not built, not on this device, not supported), or None.
    Cached per key: a forced backend pays the capability checks once, like "auto"."""
    backend = _REGISTRY.get(name)
    if backend is None:
        return f"no '{name}' backend is built into this version of pa_hybrid"
    return backend.available(key.device_type, key.device_index) or backend.supports(key)


@functools.lru_cache(maxsize=None)
def policy_for(device_type: str, device_index: int) -> tuple[DispatchTable | None, DispatchRules]:
    """The measured table (None if no table was measured on this GPU model) and the
    fallback rules of a device; found once per device."""
    if device_type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device_index)
        table = table_for(name, torch.cuda.get_device_capability(device_index), _USER_TABLES)
        return table, RULES_BY_DEVICE.get(name, RULES_BY_DEVICE["default"])
    return None, RULES_BY_DEVICE["default"]


def preference(
    key: CallKey, rules: DispatchRules, table: DispatchTable | None = None
) -> tuple[tuple[str, ...], str, TableRow | None]:
    """The backends to try, in order, the rule that ordered them and the table row it
    read (if a table covers the call). Backends the row did not measure follow in the
    rule's order. (``high_precision`` does not reorder them: every backend here keeps
    K and V at least in bf16.)"""
    if key.kernel_name is not None:
        return ("asm",), "kernelName names an asm kernel", None
    row = table.lookup(key) if table is not None else None
    order, rule = _rule_order(key, rules)
    if row is None:
        return order, rule, None
    measured = tuple(b for b in row.point.order if b in BACKEND_NAMES)
    return measured + tuple(b for b in order if b not in measured), f"measured on {row.table.gpu}: {measured[0]} fastest", row


def _rule_order(key: CallKey, rules: DispatchRules) -> tuple[tuple[str, ...], str]:
    pairs = key.concurrency * key.num_kv_heads
    rows = key.gqa * key.max_qlen
    if rows > LARGE_GROUP_ROWS:
        threshold = rules.large_group_hip_below_pairs
        if pairs < threshold:
            return ("hip", "triton", "asm", "torch"), f"{rows} query rows a kv head, {pairs} pairs < {threshold}: hip first"
        return ("triton", "hip", "asm", "torch"), f"{rows} query rows a kv head, {pairs} pairs >= {threshold}: Triton first"
    kind, threshold = ("8-bit", rules.single_pass_8bit_from_pairs) if key.kv_is_8bit else ("16-bit", rules.single_pass_from_pairs)
    if pairs >= threshold:
        return (
            ("asm", "hip", "triton", "torch"),
            f"{kind} KV, {pairs} (sequence, kv head) pairs >= {threshold}: single-pass asm first",
        )
    return (
        ("hip", "triton", "asm", "torch"),
        f"{kind} KV, {pairs} (sequence, kv head) pairs < {threshold}: split-KV first",
    )


@functools.lru_cache(maxsize=4096)
def select(key: CallKey) -> Selection:
    """The backend "auto" runs for this call. Raises ValueError when none can."""
    table, rules = policy_for(key.device_type, key.device_index)
    order, rule, row = preference(key, rules, table)
    skipped = {}
    for name in order:
        reason = unavailable_reason(name, key)
        if reason is None:
            return Selection(name, rule, skipped, row)
        skipped[name] = reason
    details = "; ".join(f"{n}: {r}" for n, r in skipped.items())
    raise ValueError(f"no backend can run this call ({key}): {details}")


def forced(name: str, key: CallKey):
    """The backend object for ``backend=name``; raises ValueError with the reason if it cannot run."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend: expected 'auto' or one of {BACKEND_NAMES}, got {name!r}")
    reason = unavailable_reason(name, key)
    if reason is not None:
        raise ValueError(f"backend={name!r} cannot run this call ({key}): {reason}")
    return _REGISTRY[name]


def backend_for(name: str, key: CallKey):
    """The backend object that runs a call with ``backend=name`` ("auto" selects)."""
    if name == "auto":
        return _REGISTRY[select(key).backend]
    return forced(name, key)


def run(name: str, call) -> None:
    """Compute ``call.out`` with ``backend=name`` ("auto" selects). A batch of no sequences
    launches nothing (a native grid cannot be empty): its rows, if any, see no token (zeros)."""
    backend = backend_for(name, call.key)
    if call.num_seqs == 0:
        call.out.zero_()
    else:
        backend.run(call)


def available_backends(device) -> list[str]:
    """Names of the registered backends that can run on ``device`` at all."""
    device = torch.device(device)
    index = device.index if device.index is not None else 0
    return [n for n in BACKEND_NAMES if n in _REGISTRY and _REGISTRY[n].available(device.type, index) is None]
