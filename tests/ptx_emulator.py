"""A PTX emulator for the asm backend's kernels, so that CPU CI runs them against the reference.

It interprets the subset of PTX that ``asm/generate.py`` emits, one CTA at a time, with
numpy arrays of one value per thread for each register. Threads keep their own program
counters; each step runs the instruction at the lowest counter for every thread there
(divergent branches reconverge where their paths meet), ``bar.sync`` holds threads until
its count arrives, and warp-wide instructions (shuffles, votes, ldmatrix, mma) check that
the whole warp is there. Global memory is the CPU tensors the argument block points at
(their real addresses; anything else, or a shared-memory access past the CTA's
allocation, raises). ``cp.async`` copies at once, so the emulator checks a kernel's
arithmetic and addressing, not its synchronization or its speed.

MMA fragment layouts are those the PTX ISA documents.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from pa_hybrid.backends import asm
from pa_hybrid.backends.base import sm_count
from pa_hybrid.runtime import env

NUMPY = {
    "u32": np.uint32, "s32": np.int32, "b32": np.uint32, "f32": np.float32,
    "u64": np.uint64, "s64": np.int64, "b64": np.uint64,
    "u16": np.uint16, "s16": np.int16, "b16": np.uint16, "f16": np.float16,
}  # fmt: skip
STORAGE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


class EmulationError(RuntimeError):
    pass


@dataclass
class Instruction:
    guard: tuple[str, bool] | None  # (predicate register, negated)
    op: str
    args: list[str]
    text: str


def _split_args(text: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def parse(ptx: str, entry: str):
    """The entry's register kinds, instructions and labels."""
    start = ptx.index(f".entry {entry}(")
    body = ptx[ptx.index("{", ptx.index(")", start)) + 1:ptx.rindex("}")]
    regs: dict[str, str] = {}
    code: list[Instruction] = []
    labels: dict[str, int] = {}
    for raw in body.split("\n"):
        line = raw.split("//")[0].strip()
        if not line:
            continue
        if line.endswith(":"):
            labels[line[:-1]] = len(code)
            continue
        line = line.rstrip(";").strip()
        if line.startswith(".reg"):
            m = re.match(r"\.reg\s+\.(\w+)\s+(.*)", line)
            kind, names = m.group(1), m.group(2)
            for name in names.split(","):
                name = name.strip()
                ranged = re.match(r"(%\w+)<(\d+)>", name)
                if ranged:
                    for i in range(int(ranged.group(2))):
                        regs[f"{ranged.group(1)}{i}"] = kind
                else:
                    regs[name] = kind
            continue
        guard = None
        m = re.match(r"@(!?)(%\w+)\s+(.*)", line)
        if m:
            guard, line = (m.group(2), m.group(1) == "!"), m.group(3)
        op, _, rest = line.partition(" ")
        code.append(Instruction(guard, op, _split_args(rest), line))
    return regs, code, labels


class Memory:
    """Global memory: CPU tensors at their own addresses."""

    def __init__(self, tensors):
        spans = {}
        for t in tensors:
            if t is None or t.numel() == 0:
                continue
            storage = t.untyped_storage()
            base = storage.data_ptr()
            spans[base] = _bytes_of(storage)
        self.bases = np.array(sorted(spans), dtype=np.uint64)
        self.buffers = [spans[int(b)] for b in self.bases]

    def _locate(self, addr: np.ndarray, width: int):
        idx = np.searchsorted(self.bases, addr, side="right").astype(np.int64) - 1
        if (idx < 0).any():
            raise EmulationError(f"global access below every tensor: {hex(int(addr[idx < 0][0]))}")
        offsets = (addr - self.bases[idx]).astype(np.int64)
        sizes = np.array([len(b) for b in self.buffers])[idx]
        bad = offsets + width > sizes
        if bad.any():
            raise EmulationError(f"global access out of bounds at {hex(int(addr[bad][0]))} ({width} bytes)")
        return idx, offsets

    def load(self, addr: np.ndarray, width: int) -> np.ndarray:
        out = np.zeros((len(addr), width), np.uint8)
        if len(addr):
            idx, offsets = self._locate(addr, width)
            for i in np.unique(idx):
                sel = idx == i
                out[sel] = self.buffers[i][offsets[sel, None] + np.arange(width)]
        return out

    def store(self, addr: np.ndarray, data: np.ndarray) -> None:
        if len(addr):
            idx, offsets = self._locate(addr, data.shape[1])
            for i in np.unique(idx):
                sel = idx == i
                self.buffers[i][offsets[sel, None] + np.arange(data.shape[1])] = data[sel]


def _bytes_of(storage) -> np.ndarray:
    """A writable uint8 view of a CPU storage."""
    return torch.tensor([], dtype=torch.uint8).set_(storage).numpy()


def _to_bytes(values: np.ndarray, width: int) -> np.ndarray:
    """Each value's bits (its own type's, which must be ``width`` bytes) as bytes."""
    values = np.ascontiguousarray(values)
    assert values.dtype.itemsize == width, (values.dtype, width)
    return values.view(np.uint8).reshape(-1, width)


def _from_bytes(data: np.ndarray, width: int) -> np.ndarray:
    return np.ascontiguousarray(data).view(STORAGE[width]).reshape(-1)


def _e4m3_to_float(byte: np.ndarray) -> np.ndarray:
    return torch.from_numpy(byte.astype(np.uint8)).view(torch.float8_e4m3fn).float().numpy()


def _ftz(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return np.where(np.abs(x) < np.float32(2.0**-126), np.float32(0) * np.sign(x), x).astype(np.float32)


class Ctas:
    """Some CTAs of a kernel, run side by side: every register an array over all their
    threads (CTA-major), shared memory and barriers per CTA, and the step loop."""

    def __init__(self, kernel: "Kernel", ctaids: list[tuple[int, int]], memory: Memory, args: bytes):
        self.k, self.mem, self.args = kernel, memory, args
        T = self.T = kernel.threads * len(ctaids)
        self.regs = {
            name: np.zeros(T, dtype=np.bool_ if kind == "pred" else STORAGE[_width(kind)])
            for name, kind in kernel.regs.items()
        }
        self.shared = np.zeros(len(ctaids) * kernel.shared_bytes, np.uint8)
        self.pc = np.zeros(T, np.int64)
        self.done = np.zeros(T, bool)
        self.waiting: dict[int, np.ndarray] = {}  # barrier id -> threads arrived
        self.cta = np.arange(T) // kernel.threads  # each thread's CTA, 0.. within this batch
        self.tid = (np.arange(T) % kernel.threads).astype(np.uint32)
        self.ctaid = [np.array([c[axis] for c in ctaids], np.uint32)[self.cta] for axis in (0, 1)]

    # ------------------------------------------------------------ operands
    def value(self, arg: str, typ: str, mask: np.ndarray) -> np.ndarray:
        """Operand ``arg`` read as PTX type ``typ`` for the threads in ``mask``."""
        n = int(mask.sum())
        if arg.startswith("%"):
            special = {"%tid.x": self.tid, "%ctaid.x": self.ctaid[0], "%ctaid.y": self.ctaid[1]}
            if arg in special:
                return special[arg][mask].astype(NUMPY[typ])
            raw = self.regs[arg][mask]
            if raw.dtype == np.bool_:
                return raw
            return raw.view(NUMPY[typ]) if raw.itemsize == np.dtype(NUMPY[typ]).itemsize else raw.astype(NUMPY[typ])
        if arg == "smem":
            return np.zeros(n, NUMPY[typ])
        if arg.startswith("0f"):  # an f32 bit pattern
            return np.full(n, int(arg[2:], 16), np.uint32).view(np.float32).astype(NUMPY[typ])
        if typ == "f32":
            return np.full(n, int(arg, 0), np.float32)
        width = np.dtype(NUMPY[typ]).itemsize
        bits = int(arg, 0) & ((1 << (8 * width)) - 1)  # two's complement for negative immediates
        return np.full(n, bits, STORAGE[width]).view(NUMPY[typ])

    def write(self, dst: str, values: np.ndarray, mask: np.ndarray) -> None:
        reg = self.regs[dst]
        if reg.dtype == np.bool_:
            reg[mask] = values
            return
        values = np.asarray(values)
        assert values.dtype.itemsize == reg.itemsize, (dst, values.dtype)
        reg[mask] = values.view(reg.dtype)

    def address(self, arg: str, mask: np.ndarray) -> np.ndarray:
        m = re.match(r"\[([%\w]+)(?:\+(-?\d+))?\]", arg)
        base, off = m.group(1), int(m.group(2) or 0)
        if base == "args":
            return np.full(int(mask.sum()), off, np.int64)
        kind = self.k.regs[base]
        base_v = self.value(base, "u64" if _width(kind) == 8 else "u32", mask).astype(np.uint64)
        return base_v + np.uint64(off) if off >= 0 else base_v - np.uint64(-off)

    def _shared_bytes(self, addr: np.ndarray, width: int, mask: np.ndarray) -> np.ndarray:
        """Indices of ``width`` bytes at each shared address of the threads in ``mask`` (in
        their own CTA's shared memory); raises past the CTA's allocation."""
        addr, size = addr.astype(np.int64), self.k.shared_bytes
        if ((addr < 0) | (addr + width > size)).any():
            raise EmulationError(f"shared access out of bounds: {addr.min()}..{addr.max() + width} of {size}")
        return (self.cta[mask] * size + addr)[:, None] + np.arange(width)

    def shared_load(self, addr: np.ndarray, width: int, mask: np.ndarray) -> np.ndarray:
        return self.shared[self._shared_bytes(addr, width, mask)]

    def shared_store(self, addr: np.ndarray, data: np.ndarray, mask: np.ndarray) -> None:
        self.shared[self._shared_bytes(addr, data.shape[1], mask)] = data

    def lanes(self, mask: np.ndarray, group: int = 32) -> np.ndarray:
        """The warps (or warpgroups) of ``mask``: all their threads must be there."""
        units = np.unique(np.nonzero(mask)[0] // group)
        for u in units:
            if not mask[u * group:(u + 1) * group].all():
                raise EmulationError(f"a {group}-thread collective reached by part of its group")
        return units

    # ------------------------------------------------------------ running
    def run(self, max_steps: int = 100_000_000) -> None:
        code = self.k.code
        for _ in range(max_steps):
            runnable = ~self.done & ~self._blocked()
            if not runnable.any():
                if self.done.all():
                    return
                raise EmulationError(f"deadlock at barriers {sorted(self.waiting)}")
            pc = self.pc[runnable].min()
            mask = runnable & (self.pc == pc)
            self.step(code[pc], mask)
        raise EmulationError("step limit")

    def _blocked(self) -> np.ndarray:
        blocked = np.zeros(self.T, bool)
        for arrived in self.waiting.values():
            blocked |= arrived
        return blocked

    def step(self, ins: Instruction, mask: np.ndarray) -> None:
        active = mask.copy()
        if ins.guard is not None:
            g = self.regs[ins.guard[0]]
            active &= ~g if ins.guard[1] else g
        op = ins.op
        root = op.split(".")[0]
        handler = getattr(self, "op_" + root, None)
        if handler is None:
            raise EmulationError(f"unsupported instruction: {ins.text}")
        next_pc = handler(ins, active, mask)
        if next_pc is None:
            self.pc[mask] += 1

    # ------------------------------------------------------------ control
    def op_bra(self, ins, active, mask):
        target = self.k.labels[ins.args[0]]
        self.pc[active] = target
        self.pc[mask & ~active] += 1
        return True

    def op_ret(self, ins, active, mask):
        self.done[active] = True
        self.pc[mask & ~active] += 1
        return True

    def op_bar(self, ins, active, mask):
        if ins.op == "bar.warp.sync":
            return None
        barrier = int(ins.args[0])
        count = int(ins.args[1]) if len(ins.args) > 1 else self.k.threads
        arrived = self.waiting.setdefault(barrier, np.zeros(self.T, bool))
        arrived |= active
        self.pc[mask & ~active] += 1
        per_cta = arrived.reshape(-1, self.k.threads).sum(axis=1)
        if (per_cta > count).any():
            raise EmulationError(f"barrier {barrier}: {per_cta.max()} threads of a CTA for a count of {count}")
        full = np.repeat(per_cta == count, self.k.threads) & arrived  # CTAs whose count has arrived go on
        self.pc[full] += 1
        arrived &= ~full
        if not arrived.any():
            del self.waiting[barrier]
        return True

    def _noop(self, ins, active, mask):
        return None

    op_createpolicy = _noop

    def op_cp(self, ins, active, mask):
        if ins.op in ("cp.async.commit_group",) or ins.op.startswith("cp.async.wait"):
            return None
        dst = self.address(ins.args[0], active)
        src = self.address(ins.args[1], active)
        size = int(ins.args[2])
        # [dst], [src], cp-size, src-size (bytes read; the rest zero-filled), cache policy
        src_size = self.value(ins.args[3], "u32", active).astype(np.int64)
        data = np.zeros((int(active.sum()), size), np.uint8)
        for width in np.unique(src_size[src_size > 0]):
            sel = src_size == width
            data[sel, :width] = self.mem.load(src[sel], int(width))
        self.shared_store(dst, data, active)
        return None

    # ------------------------------------------------------------ data movement
    def op_mov(self, ins, active, mask):
        typ = ins.op.split(".")[1]
        dst, src = ins.args
        if dst.startswith("{"):  # unpack
            parts = [p.strip() for p in dst[1:-1].split(",")]
            whole = self.value(src, typ, active)
            w = np.dtype(NUMPY[typ]).itemsize // len(parts)
            data = _to_bytes(whole, np.dtype(NUMPY[typ]).itemsize)
            for i, p in enumerate(parts):
                self.write(p, _from_bytes(data[:, i * w:(i + 1) * w], w), active)
            return None
        if src.startswith("{"):  # pack
            parts = [p.strip() for p in src[1:-1].split(",")]
            w = np.dtype(NUMPY[typ]).itemsize // len(parts)
            pieces = [_to_bytes(self.value(p, {2: "b16", 4: "b32"}[w], active), w) for p in parts]
            self.write(dst, _from_bytes(np.concatenate(pieces, axis=1), w * len(parts)), active)
            return None
        self.write(dst, self.value(src, typ, active), active)
        return None

    def op_ld(self, ins, active, mask):
        parts = ins.op.split(".")
        space, typ = parts[1], parts[-1]
        vec = int(parts[-2][1:]) if parts[-2].startswith("v") else 1
        w = np.dtype(NUMPY[typ]).itemsize
        dsts = [p.strip() for p in ins.args[0].strip("{}").split(",")]
        if space == "param":
            off = int(re.match(r"\[args\+(\d+)\]", ins.args[1]).group(1))
            raw = np.frombuffer(self.args[off:off + w], STORAGE[w])[0]
            self.write(dsts[0], np.full(int(active.sum()), raw, STORAGE[w]), active)
            return None
        addr = self.address(ins.args[1], active)
        data = self.shared_load(addr, w * vec, active) if space == "shared" else self.mem.load(addr, w * vec)
        for i, d in enumerate(dsts):
            self.write(d, _from_bytes(data[:, i * w:(i + 1) * w], w), active)
        return None

    def op_st(self, ins, active, mask):
        parts = ins.op.split(".")
        space, typ = parts[1], parts[-1]
        w = np.dtype(NUMPY[typ]).itemsize
        srcs = [p.strip() for p in ins.args[1].strip("{}").split(",")]
        data = np.concatenate([_to_bytes(self.value(s, typ, active), w) for s in srcs], axis=1)
        addr = self.address(ins.args[0], active)
        if space == "shared":
            self.shared_store(addr, data, active)
        else:
            self.mem.store(addr, data)
        return None

    def op_cvta(self, ins, active, mask):
        self.write(ins.args[0], self.value(ins.args[1], "u64", active), active)
        return None

    # ------------------------------------------------------------ integer / float arithmetic
    def _binary(self, ins, active, fn, typ=None):
        typ = typ or ins.op.split(".")[-1]
        a, b = (self.value(x, typ, active) for x in ins.args[1:3])
        with np.errstate(over="ignore", invalid="ignore"):
            self.write(ins.args[0], fn(a, b).astype(NUMPY[typ]), active)
        return None

    def op_add(self, ins, active, mask):
        return self._binary(ins, active, lambda a, b: a + b)

    def op_sub(self, ins, active, mask):
        if ins.op == "sub.f16x2":
            a, b = (self.value(x, "b32", active).view(np.float16).reshape(-1, 2) for x in ins.args[1:3])
            self.write(ins.args[0], (a - b).astype(np.float16).reshape(-1).view(np.uint32), active)
            return None
        return self._binary(ins, active, lambda a, b: a - b)

    def op_mul(self, ins, active, mask):
        parts = ins.op.split(".")
        typ = parts[-1]
        if parts[1] == "wide":
            wide = {"u32": "u64", "s32": "s64"}[typ]
            a, b = (self.value(x, typ, active).astype(NUMPY[wide]) for x in ins.args[1:3])
            self.write(ins.args[0], a * b, active)
            return None
        return self._binary(ins, active, lambda a, b: a * b)

    def op_mad(self, ins, active, mask):
        typ = ins.op.split(".")[-1]
        a, b, c = (self.value(x, typ, active) for x in ins.args[1:4])
        with np.errstate(over="ignore"):
            self.write(ins.args[0], (a * b + c).astype(NUMPY[typ]), active)
        return None

    def op_fma(self, ins, active, mask):
        a, b, c = (self.value(x, "f32", active).astype(np.float64) for x in ins.args[1:4])
        self.write(ins.args[0], (a * b + c).astype(np.float32), active)
        return None

    def op_div(self, ins, active, mask):
        return self._binary(ins, active, lambda a, b: a // b)

    def op_min(self, ins, active, mask):
        return self._binary(ins, active, lambda a, b: np.minimum(a, b) if a.dtype.kind != "f" else np.fmin(a, b))

    def op_max(self, ins, active, mask):
        if ins.op == "max.u16x2":
            a, b = (self.value(x, "b32", active).view(np.uint16).reshape(-1, 2) for x in ins.args[1:3])
            self.write(ins.args[0], np.maximum(a, b).reshape(-1).view(np.uint32), active)
            return None
        return self._binary(ins, active, lambda a, b: np.maximum(a, b) if a.dtype.kind != "f" else np.fmax(a, b))

    def op_and(self, ins, active, mask):
        return self._binary(ins, active, lambda a, b: a & b)

    def op_or(self, ins, active, mask):
        return self._binary(ins, active, lambda a, b: a | b)

    def op_xor(self, ins, active, mask):
        return self._binary(ins, active, lambda a, b: a ^ b)

    def op_shl(self, ins, active, mask):
        return self._binary(ins, active, lambda a, b: a << b.astype(a.dtype))

    def op_shr(self, ins, active, mask):
        return self._binary(ins, active, lambda a, b: a >> b.astype(a.dtype))

    def op_bfe(self, ins, active, mask):
        a, pos, length = (self.value(x, "u32", active) for x in ins.args[1:4])
        self.write(ins.args[0], (a >> pos) & ((np.uint32(1) << length) - np.uint32(1)), active)
        return None

    def op_prmt(self, ins, active, mask):
        a, b, c = (self.value(x, "b32", active) for x in ins.args[1:4])
        pool = np.concatenate([_to_bytes(a, 4), _to_bytes(b, 4)], axis=1)
        out = np.zeros((len(a), 4), np.uint8)
        for i in range(4):
            sel = (c >> np.uint32(4 * i)) & np.uint32(0xF)
            byte = pool[np.arange(len(a)), (sel & 7).astype(np.int64)]
            sign = (sel & 8) != 0
            out[:, i] = np.where(sign, np.where(byte & 0x80, 0xFF, 0), byte)
        self.write(ins.args[0], _from_bytes(out, 4), active)
        return None

    def op_ex2(self, ins, active, mask):
        a = self.value(ins.args[1], "f32", active)
        with np.errstate(over="ignore"):
            self.write(ins.args[0], _ftz(np.exp2(_ftz(a))), active)
        return None

    def op_rcp(self, ins, active, mask):
        a = self.value(ins.args[1], "f32", active)
        with np.errstate(divide="ignore"):
            self.write(ins.args[0], (np.float32(1) / a).astype(np.float32), active)
        return None

    def op_setp(self, ins, active, mask):
        parts = ins.op.split(".")
        cmp, typ = parts[1], parts[-1]
        combine = parts[2] if len(parts) == 4 else None
        a, b = (self.value(x, typ, active) for x in ins.args[1:3])
        result = {"lt": a < b, "le": a <= b, "gt": a > b, "ge": a >= b, "eq": a == b, "ne": a != b}[cmp]
        if combine:
            c = self.value(ins.args[3], "pred", active)
            result = (result & c) if combine == "and" else (result | c)
        self.write(ins.args[0], result, active)
        return None

    def op_selp(self, ins, active, mask):
        typ = ins.op.split(".")[-1]
        a, b = (self.value(x, typ, active) for x in ins.args[1:3])
        p = self.value(ins.args[3], "pred", active)
        self.write(ins.args[0], np.where(p, a, b), active)
        return None

    def op_cvt(self, ins, active, mask):
        op, (dst, *src) = ins.op, ins.args
        if op in ("cvt.s64.s32", "cvt.u64.u32"):
            typ = op.split(".")[2]
            self.write(dst, self.value(src[0], typ, active).astype(NUMPY[op.split(".")[1]]), active)
        elif op == "cvt.f32.f16":
            self.write(dst, self.value(src[0], "b16", active).view(np.float16).astype(np.float32), active)
        elif op in ("cvt.rn.f16x2.f32", "cvt.rn.bf16x2.f32"):
            hi, lo = (self.value(x, "f32", active) for x in src)
            dt = torch.float16 if op == "cvt.rn.f16x2.f32" else torch.bfloat16
            pair = torch.from_numpy(np.stack([lo, hi], axis=1)).to(dt).view(torch.int16).numpy().view(np.uint16)
            self.write(dst, _from_bytes(np.ascontiguousarray(pair).view(np.uint8).reshape(-1, 4), 4), active)
        elif op == "cvt.rni.s32.f32":
            a = self.value(src[0], "f32", active)
            self.write(dst, np.clip(np.rint(a), -(2**31), 2**31 - 1).astype(np.int32), active)
        elif op == "cvt.rn.f32.s32":
            self.write(dst, self.value(src[0], "s32", active).astype(np.float32), active)
        elif op == "cvt.rn.f16x2.e4m3x2":
            pair = _to_bytes(self.value(src[0], "b16", active), 2)
            vals = _e4m3_to_float(pair.reshape(-1)).reshape(-1, 2).astype(np.float16)
            self.write(dst, np.ascontiguousarray(vals).view(np.uint32).reshape(-1), active)
        else:
            raise EmulationError(f"unsupported conversion: {ins.text}")
        return None

    # ------------------------------------------------------------ warp collectives
    # (each over all the warps at this instruction at once: registers as [warp, lane])
    def _by_warp(self, name: str, warps: np.ndarray) -> np.ndarray:
        return self.regs[name].reshape(-1, 32)[warps]

    def op_shfl(self, ins, active, mask):
        mode = ins.op.split(".")[2]
        warps = self.lanes(active)
        a = self._by_warp(ins.args[1], warps)
        b = self.value(ins.args[2], "u32", active).reshape(-1, 32)
        lane = np.arange(32, dtype=np.uint32)
        src = lane ^ b if mode == "bfly" else b
        src = np.where(src < 32, src, lane)  # out of range: the lane's own value
        self.regs[ins.args[0]].reshape(-1, 32)[warps] = np.take_along_axis(a, src.astype(np.int64), axis=1)
        return None

    def op_vote(self, ins, active, mask):
        warps = self.lanes(active)
        q = self._by_warp(ins.args[1], warps)
        self.regs[ins.args[0]].reshape(-1, 32)[warps] = q.all(axis=1, keepdims=True)
        return None

    def op_redux(self, ins, active, mask):
        warps = self.lanes(active)
        a = self._by_warp(ins.args[1], warps)
        self.regs[ins.args[0]].reshape(-1, 32)[warps] = a.max(axis=1, keepdims=True)
        return None

    def _fragment(self, names: str, warps: np.ndarray) -> np.ndarray:
        """[warp, lane, register] bits of a brace list of registers."""
        regs = [p.strip() for p in names.strip("{}").split(",")]
        return np.stack([self._by_warp(r, warps).view(np.uint32) for r in regs], axis=2)

    def _set_fragment(self, names: str, warps: np.ndarray, values: np.ndarray) -> None:
        regs = [p.strip() for p in names.strip("{}").split(",")]
        for i, r in enumerate(regs):
            self.regs[r].reshape(-1, 32)[warps] = values[:, :, i].view(self.regs[r].dtype)

    def op_ldmatrix(self, ins, active, mask):
        """x4: lane l gives row l % 8 of matrix l / 8; lane (4 g + t) gets bytes 4t..4t+3 of row g."""
        warps = self.lanes(active)
        rows = self.address(ins.args[1], active).astype(np.int64)
        data = self.shared_load(rows, 16, active).view(np.uint32).reshape(len(warps), 32, 4)  # [warp, row, word]
        self._set_fragment(ins.args[0], warps, data[:, LDSM_ROW, LDSM_WORD])
        return None

    def op_mma(self, ins, active, mask):
        """m16n8k16 (f16 / bf16, f32 accumulators) or m16n8k32 (s8, s32 accumulators)."""
        kind = ins.op.split(".")
        int8 = "s8" in kind
        e = 4 if int8 else 2  # values a register holds: a k-step of 8 e
        warps = self.lanes(active)
        a, b, c = (self._fragment(x, warps) for x in ins.args[1:4])
        if int8:
            av, bv = (x.view(np.int8).astype(np.float64) for x in (a, b))
            c = c.view(np.int32).astype(np.float64)
        else:
            av, bv = (self._halves(x, kind[-2]) for x in (a, b))
            c = c.view(np.float32).astype(np.float64)
        (a_row, a_col), (b_row, b_col) = MMA_A[e], MMA_B[e]
        A, B = np.zeros((len(warps), 16, 8 * e)), np.zeros((len(warps), 8 * e, 8))
        A[:, a_row, a_col] = av.reshape(len(warps), 32, 4, e)
        B[:, b_row, b_col] = bv.reshape(len(warps), 32, 2, e)
        d = (A @ B)[:, MMA_D[0], MMA_D[1]] + c
        self._set_fragment(ins.args[0], warps, d.astype(np.int32 if int8 else np.float32).view(np.uint32))
        return None

    @staticmethod
    def _halves(words: np.ndarray, half: str) -> np.ndarray:
        """The 16-bit values ("f16" or "bf16") of 32-bit registers, low half first."""
        pairs = np.ascontiguousarray(words).view(np.uint16)
        if half == "f16":
            return pairs.view(np.float16).astype(np.float64)
        return (pairs.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)


def _mma_maps(e: int):
    """Where lane (4 g + t)'s fragment values sit in A [16, 8e] and B [8e, 8] of an mma.sync
    whose registers hold e values: A's registers (g, 0), (g + 8, 0), (g, 4e), (g + 8, 4e), B's
    (0, g), (4e, g), each e values along k from e t."""
    lane = np.arange(32)[:, None, None]
    g, t, j = lane // 4, lane % 4, np.arange(e)[None, None, :]
    reg = np.arange(4)[None, :, None]
    a = (np.broadcast_to(g + 8 * (reg % 2), (32, 4, e)), np.broadcast_to((reg // 2) * 4 * e + e * t + j, (32, 4, e)))
    reg = np.arange(2)[None, :, None]
    b = (np.broadcast_to(reg * 4 * e + e * t + j, (32, 2, e)), np.broadcast_to(g, (32, 2, e)))
    return a, b


MMA_A, MMA_B = ({e: _mma_maps(e)[i] for e in (2, 4)} for i in (0, 1))
_LANE = np.arange(32)
MMA_D = (  # D's row and column for lane (4 g + t)'s accumulators c0..c3
    np.stack([_LANE // 4, _LANE // 4, _LANE // 4 + 8, _LANE // 4 + 8], axis=1),
    np.stack([2 * (_LANE % 4), 2 * (_LANE % 4) + 1, 2 * (_LANE % 4), 2 * (_LANE % 4) + 1], axis=1),
)
LDSM_ROW = 8 * np.arange(4)[None, :] + (_LANE // 4)[:, None]  # ldmatrix.x4: lane's register i is row 8 i + g
LDSM_WORD = np.broadcast_to((_LANE % 4)[:, None], (32, 4))  # ... word t of that row


def _width(kind: str) -> int:
    return {"pred": 1, "b16": 2, "u16": 2, "s16": 2, "f16": 2}.get(kind, 8 if kind.endswith("64") else 4)


@dataclass
class Kernel:
    regs: dict
    code: list
    labels: dict
    threads: int
    shared_bytes: int

    @classmethod
    def load(cls, ptx: str, entry: str, threads: int, shared_bytes: int) -> "Kernel":
        regs, code, labels = parse(ptx, entry)
        return cls(regs, code, labels, threads, shared_bytes)


def launch(kernel: Kernel, grid: tuple[int, int], args: bytes, tensors, ctas_at_once: int = 32) -> None:
    """Run every CTA of ``grid`` over the CPU ``tensors`` the arguments point at,
    ``ctas_at_once`` side by side."""
    memory = Memory(tensors)
    ctaids = [(x, y) for x in range(grid[0]) for y in range(grid[1])]
    for i in range(0, len(ctaids), ctas_at_once):
        Ctas(kernel, ctaids[i:i + ctas_at_once], memory, args).run()


class EmulatedAsmBackend(asm.AsmBackend):
    """The asm backend on CPU tensors: the same capability checks and kernel choice, the
    kernel run by this emulator (tests/conftest.py registers it where there is no GPU, so
    every test of a forced or chosen "asm" runs its PTX)."""

    device_types = ("cpu",)

    def available(self, device_type, device_index):
        return None if device_type == "cpu" else "the PTX emulator runs on CPU tensors"

    def run(self, call) -> None:
        key = call.key
        kernel = asm.kernel_for(key, asm.prefers_four_warps(key, call.num_seqs * key.num_kv_heads, sm_count("cpu", 0)))
        program = Kernel.load((env.asm_dir() / kernel.file).read_text(), kernel.entry, kernel.threads, kernel.shared_bytes)
        tensors = [call.Q, call.K, call.V, call.out, call.block_tables, call.context_lens, call.qo_indptr]
        launch(program, (call.num_seqs, key.num_kv_heads), bytes(asm.params(call)), tensors + [call.k_scale, call.v_scale])
