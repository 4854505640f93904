"""Render the asm backend's PTX kernels and their manifest from one template.

    python asm/generate.py            # rewrite asm/*.ptx and asm/manifest.csv
    python asm/generate.py --check    # exit 1 if the committed files differ

One kernel per (query dtype, kv dtype, row tiles). Everything that a reader of the
PTX needs (algorithm, register and shared-memory plan, argument block) is written
into each file's header comment; this script only unrolls the per-fragment work
with Python loops so that every register has a name.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent

HEAD = 128  # head size
BS = 16  # tokens per cache block
Q_STRIDE = HEAD + 8  # query row pitch in shared memory (elements): the pad spreads ldmatrix rows over banks
SM_SHARED_BYTES = 228 * 1024  # sm_90: shared memory per SM
CTA_RESERVED_SHARED_BYTES = 1024  # of it, reserved by the system per resident CTA
MAX_THREADS_PER_SM = 2048
O_STRIDE = HEAD + 8  # merge row pitch (floats): the 8 rows x 4 dim pairs a warp stores per step on distinct banks
NEG_INF = "0fFF800000"
REF_FLOOR = "0f0D800000"  # 2^-100: the least largest weight of a row (8-bit kernels)

# The packed argument block: (name, PTX type, byte offset). Mirrored by
# pa_hybrid/backends/asm.py (AsmParams); tests/test_asm_backend.py checks they agree.
ARGS = [
    ("out", "u64", 0),
    ("q", "u64", 8),
    ("k", "u64", 16),
    ("v", "u64", 24),
    ("k_scale", "u64", 32),
    ("v_scale", "u64", 40),
    ("block_tables", "u64", 48),
    ("context_lens", "u64", 56),
    ("qo_indptr", "u64", 64),
    ("q_row_bytes", "s64", 72),
    ("q_head_bytes", "s64", 80),
    ("out_row_bytes", "s64", 88),
    ("out_head_bytes", "s64", 96),
    ("k_block_bytes", "s64", 104),
    ("k_head_bytes", "s64", 112),
    ("v_block_bytes", "s64", 120),
    ("v_head_bytes", "s64", 128),
    ("scale_block_bytes", "s64", 136),
    ("scale_head_bytes", "s64", 144),
    ("block_table_row_bytes", "s64", 152),
    ("scale_log2", "f32", 160),
    ("gqa", "s32", 164),
    ("max_qlen", "s32", 168),
    ("per_token_scales", "s32", 172),
    ("table_len", "s32", 176),
    ("max_seq_len", "s32", 180),
    ("stream_evict_first", "s32", 184),
]
ARGS_BYTES = 192  # padded to the block's 8-byte alignment

DTYPE_NAMES = {"bf16": "bfloat16", "f16": "float16", "e4m3": "float8_e4m3fn", "s8": "int8"}


@dataclass(frozen=True)
class Variant:
    q: str  # "bf16" | "f16"
    kv: str  # "bf16" | "f16" | "e4m3" | "s8"
    row_tiles: int  # 16-row MMA tiles of query rows (gqa * max_qlen <= 16 * row_tiles)
    warps: int  # 16-bit: 4 (2 CTAs per SM) or 8 (1 per SM); 8-bit 16 rows: 4 (4 per SM) or 8 (2 per SM)
    qk_s8: bool = False  # int8 caches: S = Q K^T by int8 MMAs on K as stored, Q rounded to int8

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def eight_bit(self) -> bool:
        return self.kv in ("e4m3", "s8")

    @property
    def mma_type(self) -> str:
        """8-bit caches compute in fp16 whatever the query dtype: e4m3 and int8 widen to
        fp16 in one or two instructions per pair, to bf16 in four or five."""
        return "f16" if self.eight_bit else self.q

    @property
    def kv_bytes(self) -> int:
        return 1 if self.eight_bit else 2

    @property
    def x(self) -> int:
        return 16 // self.kv_bytes

    @property
    def rows(self) -> int:
        return 16 * self.row_tiles

    @property
    def kv_tile(self) -> int:  # bytes of one cache block of K (or of V) for one head
        return HEAD * BS * self.kv_bytes

    @property
    def stage(self) -> int:  # K tile, V tile, and for 8-bit the block's 16 K and 16 V scales
        return 2 * self.kv_tile + (2 * BS * 4 if self.eight_bit else 0)

    @property
    def stages(self) -> int:
        return 3

    @property
    def q_bytes(self) -> int:
        return self.rows * Q_STRIDE * 2

    @property
    def ring_bytes(self) -> int:
        return self.warps * self.stages * self.stage

    @property
    def merge_bytes(self) -> int:
        return self.warps * self.rows * (O_STRIDE + 2) * 4

    @property
    def smem_bytes(self) -> int:
        return self.q_bytes + max(self.ring_bytes, self.merge_bytes)

    @property
    def ctas_per_sm(self) -> int:
        """CTAs that fit one SM's shared memory (228 KB on sm_90, 1 KB of it reserved per CTA)."""
        return min(SM_SHARED_BYTES // (self.smem_bytes + CTA_RESERVED_SHARED_BYTES), MAX_THREADS_PER_SM // self.threads)

    @property
    def register_capped(self) -> bool:
        """Whether the PTX asks ptxas for registers that let ``ctas_per_sm`` CTAs fit
        (.minnctapersm). The 4-warp 8-bit kernels need it (fp16 queries over int8 took 138
        registers without it: 3 CTAs per SM, not 4). The others fit without it, but the
        directive changes ptxas's schedule: the 8-warp e4m3 kernels' took 0.97x the time on
        20-100 us fp8 calls and up to 0.92x on long contexts of few CTAs (H100, RESULTS.md
        section 39); the rest keep the code they were measured with."""
        return self.eight_bit and (self.warps == 4 or (self.kv == "e4m3" and self.rows == 16))

    @property
    def precision(self) -> str:
        """The high_precision levels served (DESIGN.md: "0 may compute in 8-bit"): Q in 8 bits
        at 0 only, and the widening int8 kernels at 1 and 2 only, so each level has one kernel."""
        if self.qk_s8:
            return "0"
        return "1;2" if self.kv == "s8" else "0;1;2"

    @property
    def name(self) -> str:
        qk = "_qks8" if self.qk_s8 else ""
        return f"pa_decode_q{self.q}_kv{self.kv}{qk}_rows{self.rows}_w{self.warps}"

    @property
    def file(self) -> str:
        return f"{self.name}.ptx"


VARIANTS = [
    Variant(q, kv, tiles, warps, qk_s8)
    for q in ("bf16", "f16")
    for kv in (q, "e4m3", "s8")
    for qk_s8 in ((False, True) if kv == "s8" else (False,))
    for tiles in (1, 2)
    # 8-bit caches: 4 warps only for 16 rows (the 32-row kernels need 240 registers, so 4
    # warps would leave 8 per SM)
    for warps in ((4, 8) if kv == q or tiles == 1 else (8,))
]


class Ptx:
    """A kernel body under construction: instructions plus the registers they name."""

    def __init__(self):
        self.lines: list[str] = []
        self.regs: dict[str, str] = {}
        self._labels = 0

    def reg(self, kind: str, name: str) -> str:
        full = "%" + name
        known = self.regs.setdefault(full, kind)
        assert known == kind, f"{full} declared as {known} and {kind}"
        return full

    def __call__(self, instruction: str) -> None:
        self.lines.append("    " + instruction + ";")

    def comment(self, text: str) -> None:
        self.lines.append("    // " + text)

    def section(self, text: str) -> None:
        self.lines.append("")
        self.lines.append(f"    // ---- {text} ----")

    def label(self, name: str) -> None:
        self.lines.append(f"{name}:")

    def new_label(self, stem: str) -> str:
        self._labels += 1
        return f"${stem}_{self._labels}"

    def declarations(self) -> list[str]:
        by_kind: dict[str, list[str]] = {}
        for name, kind in self.regs.items():
            by_kind.setdefault(kind, []).append(name)
        out = []
        for kind, names in by_kind.items():
            for i in range(0, len(names), 8):
                out.append(f"    .reg .{kind} {', '.join(names[i:i + 8])};")
        return out


class Kernel:
    def __init__(self, v: Variant):
        self.v = v
        self.p = Ptx()
        p = self.p
        # registers every phase uses
        self.tid, self.lane, self.warp = p.reg("u32", "thread"), p.reg("u32", "lane"), p.reg("u32", "warp")
        self.quad_row, self.quad_col = p.reg("u32", "quad_row"), p.reg("u32", "quad_col")  # lane / 4, lane % 4
        self.seq, self.kv_head = p.reg("u32", "seq"), p.reg("u32", "kv_head")
        self.smem = p.reg("u32", "smem_base")
        self.ring = p.reg("u32", "ring_base")
        self.stream_policy = p.reg("b64", "stream_policy")

    # ----------------------------------------------------------------- helpers
    def tmp(self, kind: str, name: str) -> str:
        return self.p.reg(kind, name)

    def arg(self, name: str) -> str:
        kind, offset = next((k, o) for n, k, o in ARGS if n == name)
        reg = self.p.reg(kind if kind != "u64" else "u64", "arg_" + name)
        self.p(f"ld.param.{kind} {reg}, [args+{offset}]")
        return reg

    def global_ptr(self, name: str) -> str:
        generic = self.arg(name)
        self.p(f"cvta.to.global.u64 {generic}, {generic}")
        return generic

    def pack(self, dst: str, lo: str, hi: str, kind: str) -> None:
        """Two f32 -> one register of two ``kind`` ("bf16" | "f16") values (lo in the low half)."""
        self.p(f"cvt.rn.{kind}x2.f32 {dst}, {hi}, {lo}")

    def mma(self, acc: list[str], a: list[str], b: list[str], *, int8: bool = False) -> None:
        """acc += a b: m16n8k16 in the kernel's 16-bit type with f32 accumulators, or with
        ``int8`` (registers of four int8 values) m16n8k32 with s32 accumulators."""
        t = self.v.mma_type
        shape = "m16n8k32.row.col.s32.s8.s8.s32" if int8 else f"m16n8k16.row.col.f32.{t}.{t}.f32"
        accs = ", ".join(acc)
        self.p(f"mma.sync.aligned.{shape} {{{accs}}}, {{{', '.join(a)}}}, {{{', '.join(b)}}}, {{{accs}}}")

    def widen(self, packed: str, lo_pair: str, hi_pair: str) -> None:
        """Four 8-bit cache values (one ldmatrix register) -> two registers of two fp16
        values each (bytes 0, 1 and 2, 3); exact for e4m3 and int8."""
        p, v = self.p, self.v
        if v.kv == "e4m3":
            h = [self.tmp("b16", f"w_h{i}") for i in range(2)]
            p(f"mov.b32 {{{h[0]}, {h[1]}}}, {packed}")
            p(f"cvt.rn.f16x2.e4m3x2 {lo_pair}, {h[0]}")
            p(f"cvt.rn.f16x2.e4m3x2 {hi_pair}, {h[1]}")
            return
        # int8 by the magic number 1024: byte ^ 0x80 = x + 128 as the low mantissa bits of
        # 0x6400 (1024.0) gives 1152 + x exactly; subtract 1152 (0x6480)
        biased, magic = self.tmp("b32", "w_biased"), self.tmp("b32", "w_magic")
        p(f"xor.b32 {biased}, {packed}, 0x80808080")
        p(f"mov.b32 {magic}, 0x64806480")
        p(f"prmt.b32 {lo_pair}, {biased}, 0x64646464, 0x4140")
        p(f"prmt.b32 {hi_pair}, {biased}, 0x64646464, 0x4342")
        p(f"sub.f16x2 {lo_pair}, {lo_pair}, {magic}")
        p(f"sub.f16x2 {hi_pair}, {hi_pair}, {magic}")

    # ----------------------------------------------------------------- phases
    def render(self) -> str:
        self.prologue()
        self.main_loop()
        self.merge_and_store()
        body = self.p.lines
        v = self.v
        decl = self.p.declarations()
        head = [
            header_comment(v),
            ".version 8.0",
            ".target sm_90",
            ".address_size 64",
            "",
            ".extern .shared .align 16 .b8 smem[];",
            "",
            f".visible .entry {v.name}(",
            f"    .param .align 8 .b8 args[{ARGS_BYTES}]",
            ")",
            f".maxntid {v.threads}, 1, 1",
            *([f".minnctapersm {v.ctas_per_sm}"] if v.register_capped else []),
            "{",
            "    .reg .pred %p<8>;",
        ]
        return "\n".join(head + decl + body + ["    ret;", "}", ""])

    def prologue(self):
        p, v = self.p, self.v
        p.section("phase 0: who am I; the sequence's context length and new-token rows")
        p(f"mov.u32 {self.tid}, %tid.x")
        p(f"shr.u32 {self.warp}, {self.tid}, 5")
        p(f"and.b32 {self.lane}, {self.tid}, 31")
        p(f"shr.u32 {self.quad_row}, {self.lane}, 2")
        p(f"and.b32 {self.quad_col}, {self.lane}, 3")
        p(f"mov.u32 {self.seq}, %ctaid.x")
        p(f"mov.u32 {self.kv_head}, %ctaid.y")
        p(f"mov.u32 {self.smem}, smem")
        p(f"add.u32 {self.ring}, {self.smem}, {v.q_bytes}")
        # the K/V stream is read once per call: where the launcher asks, its L2 lines go first,
        # so it does not push out what other kernels left in L2 (dirty lines, whose write-back
        # would share DRAM with it); otherwise the normal policy (what the launcher picks and why:
        # pa_hybrid/backends/asm.py, EVICT_FIRST_MAX_BYTES)
        # (a selp of two policies: created under predicates instead, the policy took 10 more
        # registers in the 8-bit kernels, past the 128 of two CTAs per SM)
        normal = self.tmp("b64", "normal_policy")
        p(f"createpolicy.fractional.L2::evict_first.b64 {self.stream_policy}, 1.0")
        p(f"createpolicy.fractional.L2::evict_normal.b64 {normal}, 1.0")
        p(f"setp.ne.s32 %p1, {self.arg('stream_evict_first')}, 0")
        p(f"selp.b64 {self.stream_policy}, {self.stream_policy}, {normal}, %p1")
        self.gqa = self.arg("gqa")
        max_qlen = self.arg("max_qlen")
        self.rows_used = self.tmp("s32", "rows_used")  # gqa * max_qlen query rows of the group
        p(f"mul.lo.s32 {self.rows_used}, {self.gqa}, {max_qlen}")
        lens = self.global_ptr("context_lens")
        addr = self.tmp("u64", "addr")
        self.ctx = self.tmp("s32", "context_len")
        p(f"mul.wide.u32 {addr}, {self.seq}, 4")
        p(f"add.s64 {addr}, {addr}, {lens}")
        p(f"ld.global.nc.s32 {self.ctx}, [{addr}]")
        self.load_table_chunk(first=True)
        # a longer context counts as max_seq_len tokens (what the host checks cover), a negative one as 0
        p(f"min.s32 {self.ctx}, {self.ctx}, {self.arg('max_seq_len')}")
        p(f"max.s32 {self.ctx}, {self.ctx}, 0")
        # max_qlen == 1: row = seq, one new token. Otherwise qo_indptr gives them.
        self.first_row, self.num_new = self.tmp("s32", "first_row"), self.tmp("s32", "num_new")
        p(f"mov.s32 {self.first_row}, {self.seq}")
        p(f"mov.s32 {self.num_new}, 1")
        p(f"setp.gt.s32 %p0, {max_qlen}, 1")
        indptr = self.global_ptr("qo_indptr")
        last = self.tmp("s32", "next_row")
        p(f"mul.wide.u32 {addr}, {self.seq}, 4")
        p(f"add.s64 {addr}, {addr}, {indptr}")
        p(f"@%p0 ld.global.nc.s32 {self.first_row}, [{addr}]")
        p(f"@%p0 ld.global.nc.s32 {last}, [{addr}+4]")
        p(f"@%p0 sub.s32 {self.num_new}, {last}, {self.first_row}")
        # query / output row and head strides, and this group's first head
        self.q_ptr, self.out_ptr = self.global_ptr("q"), self.global_ptr("out")
        self.q_row, self.q_head = self.arg("q_row_bytes"), self.arg("q_head_bytes")
        self.out_row, self.out_head = self.arg("out_row_bytes"), self.arg("out_head_bytes")
        self.head0 = self.tmp("u32", "head0")
        p(f"mul.lo.u32 {self.head0}, {self.kv_head}, {self.gqa}")

    def row_address(self, m: str, base: str, row_stride: str, head_stride: str, tag: str):
        """Validity predicate and byte address of group row ``m`` (m = i * gqa + g: new token
        i, group member g) in a [rows, heads, HEAD] tensor; sets %p1 to "row exists"."""
        p = self.p
        i, g = self.tmp("u32", f"{tag}_i"), self.tmp("u32", f"{tag}_g")
        p(f"div.u32 {i}, {m}, {self.gqa}")
        p(f"mul.lo.u32 {g}, {i}, {self.gqa}")
        p(f"sub.u32 {g}, {m}, {g}")
        p(f"setp.lt.s32 %p1, {m}, {self.rows_used}")
        p(f"setp.lt.and.s32 %p1, {i}, {self.num_new}, %p1")
        row, head = self.tmp("s64", f"{tag}_row"), self.tmp("s64", f"{tag}_head")
        r32 = self.tmp("s32", f"{tag}_row32")
        p(f"add.s32 {r32}, {self.first_row}, {i}")
        p(f"cvt.s64.s32 {row}, {r32}")
        p(f"add.u32 {g}, {g}, {self.head0}")
        p(f"cvt.u64.u32 {head}, {g}")
        addr = self.tmp("u64", f"{tag}_addr")
        p(f"mad.lo.s64 {addr}, {row}, {row_stride}, {base}")
        p(f"mad.lo.s64 {addr}, {head}, {head_stride}, {addr}")
        return addr

    def load_query(self):
        p, v = self.p, self.v
        p.section("phase 2: the group's query rows into shared memory, rows past the group zero")
        if v.qk_s8:
            p.comment("int8 Q K^T: a row's dims as int8 in order (bytes 0..127 of the row): A fragments of m16n8k32")
        elif v.eight_bit:
            p.comment("8-bit caches: the two dims of word w of each 16-dim chunk go to pair slot")
            p.comment("(w % 2) * 4 + w / 2, so the A fragment's k order matches the widened B (see header)")
        # thread: row m = tid / 64 + 2 r, word w = tid % 64 (dims 2w, 2w+1)
        word, m0 = self.tmp("u32", "q_word"), self.tmp("u32", "q_row0")
        p(f"and.b32 {word}, {self.tid}, 63")
        p(f"shr.u32 {m0}, {self.tid}, 6")
        slot = self.tmp("u32", "q_slot")  # byte offset of the word inside a row
        if v.qk_s8:
            p(f"shl.b32 {slot}, {word}, 1")
        elif v.eight_bit:
            chunk, inner, t = self.tmp("u32", "q_chunk"), self.tmp("u32", "q_inner"), self.tmp("u32", "q_t")
            p(f"shr.u32 {chunk}, {word}, 3")
            p(f"and.b32 {inner}, {word}, 7")
            p(f"and.b32 {t}, {inner}, 1")
            p(f"shl.b32 {t}, {t}, 2")
            p(f"shr.u32 {inner}, {inner}, 1")
            p(f"add.u32 {inner}, {inner}, {t}")
            p(f"shl.b32 {chunk}, {chunk}, 5")
            p(f"shl.b32 {inner}, {inner}, 2")
            p(f"add.u32 {slot}, {chunk}, {inner}")
        else:
            p(f"shl.b32 {slot}, {word}, 2")
        word_bytes = self.tmp("u64", "q_word_bytes")
        p(f"mul.wide.u32 {word_bytes}, {word}, 4")
        m, dst = self.tmp("u32", "q_m"), self.tmp("u32", "q_dst")
        words = range(v.rows * (HEAD // 2) // v.threads)
        convert = v.q != v.mma_type or v.qk_s8  # all loaded, then scaled and converted
        vals = [self.tmp("b32", f"q_val{r}" if convert else "q_val") for r in words]
        for r in words:
            p(f"add.u32 {m}, {m0}, {v.threads // 64 * r}")
            addr = self.row_address(m, self.q_ptr, self.q_row, self.q_head, "q")
            p(f"add.s64 {addr}, {addr}, {word_bytes}")
            p(f"mov.b32 {vals[r]}, 0")
            p(f"@%p1 ld.global.nc.b32 {vals[r]}, [{addr}]")
            if not convert:
                p(f"mad.lo.u32 {dst}, {m}, {Q_STRIDE * 2}, {slot}")
                p(f"add.u32 {dst}, {dst}, {self.smem}")
                p(f"st.shared.b32 [{dst}], {vals[r]}")
        if convert:
            self.scale_query(vals)
            halves = [self.tmp("b16", f"q_half{i}") for i in range(2)] if v.qk_s8 else []
            for r in words:
                p(f"add.u32 {m}, {m0}, {v.threads // 64 * r}")
                p(f"mad.lo.u32 {dst}, {m}, {Q_STRIDE * 2}, {slot}")
                p(f"add.u32 {dst}, {dst}, {self.smem}")
                if v.qk_s8:  # two int8 values in the low half
                    p(f"mov.b32 {{{halves[0]}, {halves[1]}}}, {vals[r]}")
                    p(f"st.shared.b16 [{dst}], {halves[0]}")
                else:
                    p(f"st.shared.b32 [{dst}], {vals[r]}")
        p("bar.sync 0")

    def scale_query(self, vals: list[str]):
        """Query words (two values each) -> the Q K^T operand, all scaled by one power of two
        2^e per CTA that puts the group's largest |q| in [2^T, 2^(T+1)); the logit scale takes
        2^-e. bf16 -> fp16: T = 14, so every bf16 value down to 2^-31 of the largest is exact
        and nothing overflows. int8 (``qk_s8``): T = 6, values rounded to the nearest integer
        (saturated at 127), so each keeps 7-8 significant bits of the largest's scale."""
        p, v = self.p, self.v
        target = 6 if v.qk_s8 else 14
        mantissa, bias = (7, 127) if v.q == "bf16" else (10, 15)
        p.comment(f"{v.q} -> {'int8' if v.qk_s8 else 'fp16'}: the CTA's largest |q| ({v.q} bit patterns order like their values)")
        mag, t = self.tmp("b32", "q_mag"), self.tmp("b32", "q_mag_t")
        p(f"and.b32 {mag}, {vals[0]}, 0x7FFF7FFF")
        for val in vals[1:]:
            p(f"and.b32 {t}, {val}, 0x7FFF7FFF")
            p(f"max.u16x2 {mag}, {mag}, {t}")
        p(f"shr.b32 {t}, {mag}, 16")
        p(f"and.b32 {mag}, {mag}, 0xFFFF")
        p(f"max.u32 {mag}, {mag}, {t}")
        p(f"redux.sync.max.u32 {mag}, {mag}, 0xffffffff")
        p.comment(f"warps meet in the pads of query rows 0..{v.warps - 1} (bytes {HEAD * 2}.. of a row; ldmatrix never reads them)")
        pad = self.tmp("u32", "q_pad")
        p(f"mad.lo.u32 {pad}, {self.warp}, {Q_STRIDE * 2}, {self.smem}")
        p(f"st.shared.u32 [{pad}+{HEAD * 2}], {mag}")
        p("bar.sync 0")
        for w in range(v.warps):
            p(f"ld.shared.u32 {t}, [{self.smem}+{w * Q_STRIDE * 2 + HEAD * 2}]")
            p(f"max.u32 {mag}, {mag}, {t}")
        field_base = target + bias + 127
        p.comment(f"exponent field E of the largest |q|: 2^e = 2^({field_base - 127} - E) (at most 2^100: smaller q are ~0 anyway)")
        field, inv = self.tmp("s32", "q_scale_field"), self.tmp("s32", "q_inv_field")
        scale, inv_scale = self.tmp("f32", "q_scale"), self.tmp("f32", "q_inv_scale")
        p(f"shr.b32 {mag}, {mag}, {mantissa}")
        p(f"mov.s32 {field}, {field_base}")
        p(f"sub.s32 {field}, {field}, {mag}")
        p(f"min.s32 {field}, {field}, 227")
        p(f"mov.s32 {inv}, 254")
        p(f"sub.s32 {inv}, {inv}, {field}")
        p(f"shl.b32 {field}, {field}, 23")
        p(f"shl.b32 {inv}, {inv}, 23")
        p(f"mov.b32 {scale}, {field}")
        p(f"mov.b32 {inv_scale}, {inv}")
        p(f"mul.f32 {self.qk_scale}, {self.qk_scale}, {inv_scale}")
        lo, hi = self.tmp("f32", "q_lo"), self.tmp("f32", "q_hi")
        if v.q == "f16":
            h = [self.tmp("b16", f"q_f16_{i}") for i in range(2)]
        if v.qk_s8:
            lo_int, hi_int = self.tmp("s32", "q_lo_int"), self.tmp("s32", "q_hi_int")
        for val in vals:
            if v.q == "bf16":
                p(f"shl.b32 {lo}, {val}, 16")
                p(f"and.b32 {hi}, {val}, 0xFFFF0000")
            else:
                p(f"mov.b32 {{{h[0]}, {h[1]}}}, {val}")
                p(f"cvt.f32.f16 {lo}, {h[0]}")
                p(f"cvt.f32.f16 {hi}, {h[1]}")
            p(f"mul.f32 {lo}, {lo}, {scale}")
            p(f"mul.f32 {hi}, {hi}, {scale}")
            if v.qk_s8:
                p(f"cvt.rni.s32.f32 {lo_int}, {lo}")
                p(f"cvt.rni.s32.f32 {hi_int}, {hi}")
                p(f"min.s32 {lo_int}, {lo_int}, 127")
                p(f"min.s32 {hi_int}, {hi_int}, 127")
                p(f"prmt.b32 {val}, {lo_int}, {hi_int}, 0x0040")
            else:
                self.pack(val, lo, hi, "f16")

    def row_limits(self):
        """Per lane, for each of its rows (quad_row + 8h of each tile): tokens it sees."""
        p, v = self.p, self.v
        p.section("tokens each of this lane's rows sees: context_len - num_new + i + 1 (causal), 0 past the group")
        self.limit = {}
        base = self.tmp("s32", "limit_base")
        p(f"sub.s32 {base}, {self.ctx}, {self.num_new}")
        p(f"add.s32 {base}, {base}, 1")
        m, i = self.tmp("u32", "lim_m"), self.tmp("u32", "lim_i")
        for mt in range(v.row_tiles):
            for h in range(2):
                lim = self.tmp("s32", f"limit_m{mt}_h{h}")
                p(f"add.u32 {m}, {self.quad_row}, {16 * mt + 8 * h}")
                p(f"div.u32 {i}, {m}, {self.gqa}")
                p(f"setp.lt.s32 %p1, {m}, {self.rows_used}")
                p(f"setp.lt.and.s32 %p1, {i}, {self.num_new}, %p1")
                p(f"add.s32 {lim}, {base}, {i}")
                p(f"selp.s32 {lim}, {lim}, 0, %p1")
                self.limit[mt, h] = lim

    def main_loop(self):
        p, v = self.p, self.v
        p.section(f"phase 1 setup: this warp's cache blocks are warp, warp + {v.warps}, ...; per-lane copy offsets")
        num_blocks, mine = self.tmp("s32", "num_blocks"), self.tmp("s32", "my_blocks")
        p(f"add.s32 {num_blocks}, {self.ctx}, {BS - 1}")
        p(f"shr.s32 {num_blocks}, {num_blocks}, 4")
        p(f"sub.s32 {mine}, {num_blocks}, {self.warp}")
        p(f"add.s32 {mine}, {mine}, {v.warps - 1}")
        p(f"shr.s32 {mine}, {mine}, {v.warps.bit_length() - 1}")
        self.mine = mine
        # K/V bases of this kv head (+ this lane's 16-byte column)
        head64 = self.tmp("u64", "kv_head64")
        p(f"cvt.u64.u32 {head64}, {self.kv_head}")
        lane16 = self.tmp("u64", "lane_x16")
        p(f"mul.wide.u32 {lane16}, {self.lane}, 16")
        self.bases = {}
        for name in ("k", "v"):
            base = self.global_ptr(name)
            p(f"mad.lo.s64 {base}, {head64}, {self.arg(name + '_head_bytes')}, {base}")
            p(f"add.s64 {base}, {base}, {lane16}")
            self.bases[name] = (base, self.arg(name + "_block_bytes"))
        # the lane's destination inside a stage: K chunk (dim chunk c, token tok) of a 16-bit
        # cache lands as stored; for 8-bit caches token tok lands on row 8 * (tok / 2 % 2) +
        # 2 * (tok / 4) + tok % 2 so that each n-tile's (permuted) tokens are 8 adjacent rows
        self.lane_tok = self.tmp("u32", "lane_token")  # the token of every K chunk this lane copies
        p(f"and.b32 {self.lane_tok}, {self.lane}, 15")
        self.k_dst = self.tmp("u32", "k_dst_lane")
        if v.eight_bit:
            t, row = self.tmp("u32", "kd_t"), self.tmp("u32", "kd_row")
            p(f"bfe.u32 {row}, {self.lane_tok}, 1, 1")
            p(f"shl.b32 {row}, {row}, 3")
            p(f"shr.u32 {t}, {self.lane_tok}, 2")
            p(f"shl.b32 {t}, {t}, 1")
            p(f"add.u32 {row}, {row}, {t}")
            p(f"and.b32 {t}, {self.lane_tok}, 1")
            p(f"add.u32 {row}, {row}, {t}")
            p(f"shr.u32 {t}, {self.lane}, 4")  # dim chunk of this lane's first K copy
            p(f"shl.b32 {t}, {t}, 4")
            p(f"add.u32 {row}, {row}, {t}")
            p(f"shl.b32 {self.k_dst}, {row}, 4")
        else:
            p(f"shl.b32 {self.k_dst}, {self.lane}, 4")
        # 8-bit: per-token scales (lanes 0-15 copy K's, 16-31 V's) or one per-tensor pair
        if v.eight_bit:
            self.per_token = "%p2"
            flag = self.arg("per_token_scales")
            p(f"setp.ne.s32 {self.per_token}, {flag}, 0")
            ks, vs = self.global_ptr("k_scale"), self.global_ptr("v_scale")
            sblock, shead = self.arg("scale_block_bytes"), self.arg("scale_head_bytes")
            self.scale_block = sblock
            src = self.tmp("u64", "scale_lane_src")
            p(f"setp.lt.u32 %p1, {self.lane}, 16")
            p(f"selp.b64 {src}, {ks}, {vs}, %p1")
            p(f"mad.lo.s64 {src}, {head64}, {shead}, {src}")
            tok4 = self.tmp("u64", "lane_tok_x4")
            p(f"mul.wide.u32 {tok4}, {self.lane_tok}, 4")
            p(f"add.s64 {src}, {src}, {tok4}")
            self.scale_src = src
            # per-tensor: K's scale folds into the logit scale, V's into the final weights (read then)
            self.qk_scale = self.tmp("f32", "qk_scale")
            p(f"ld.param.f32 {self.qk_scale}, [args+{_offset('scale_log2')}]")
            one = self.tmp("f32", "k_tensor_scale")
            p(f"@!{self.per_token} ld.global.nc.f32 {one}, [{ks}]")
            p(f"@!{self.per_token} mul.f32 {self.qk_scale}, {self.qk_scale}, {one}")
            self.k_tok_scale = [self.tmp("f32", f"k_tok_scale{i}") for i in range(4)]
            self.v_tok_scale = [self.tmp("f32", f"v_tok_scale{i}") for i in range(4)]
            for r in self.k_tok_scale + self.v_tok_scale:
                p(f"mov.f32 {r}, 0f3F800000")
        else:
            self.qk_scale = self.tmp("f32", "qk_scale")
            p(f"ld.param.f32 {self.qk_scale}, [args+{_offset('scale_log2')}]")

        # ring pointers of this warp: the stage being computed and the one being filled
        my_ring = self.tmp("u32", "my_ring")
        p(f"mad.lo.u32 {my_ring}, {self.warp}, {v.stages * v.stage}, {self.ring}")
        self.ring_end = self.tmp("u32", "my_ring_end")
        self.my_ring = my_ring
        p(f"add.u32 {self.ring_end}, {my_ring}, {v.stages * v.stage}")

        p.section(f"phase 1: start this warp's {v.stages}-stage cp.async ring; the copies fly while the query loads")
        issue_block = self.tmp("s32", "issue_block")  # block index (in the sequence) to copy next
        issued = self.tmp("s32", "issued")  # blocks this warp has copied (or skipped) so far
        fill = self.tmp("u32", "fill_stage")
        p(f"mov.s32 {issue_block}, {self.warp}")
        p(f"mov.s32 {issued}, 0")
        p(f"mov.u32 {fill}, {my_ring}")
        for s in range(v.stages - 1):
            skip = p.new_label("prefetch_done")
            p(f"setp.le.s32 %p1, {mine}, {s}")
            p(f"@%p1 bra.uni {skip}")
            self.issue(issued, issue_block, fill)
            p.label(skip)
            p("cp.async.commit_group")
            p(f"add.s32 {issue_block}, {issue_block}, {v.warps}")
            p(f"add.s32 {issued}, {issued}, 1")
            p(f"add.u32 {fill}, {fill}, {v.stage}")
        self.load_query()
        self.row_limits()
        self.init_accumulators()
        p.section("phase 3: stream this warp's blocks through its ring")
        j, cur, token0 = self.tmp("s32", "j"), self.tmp("u32", "cur_stage"), self.tmp("s32", "token0")
        p(f"mov.s32 {j}, 0")
        p(f"mov.u32 {cur}, {my_ring}")
        p(f"shl.b32 {token0}, {self.warp}, 4")
        done, top = p.new_label("loop_done"), p.new_label("loop")
        p(f"setp.ge.s32 %p1, {j}, {mine}")
        p(f"@%p1 bra.uni {done}")
        p.label(top)
        no_fill = p.new_label("no_fill")
        nxt = self.tmp("s32", "j_fill")
        p(f"add.s32 {nxt}, {j}, {v.stages - 1}")
        p(f"setp.ge.s32 %p1, {nxt}, {mine}")
        p(f"@%p1 bra.uni {no_fill}")
        self.issue(issued, issue_block, fill)
        p.label(no_fill)
        p("cp.async.commit_group")
        p(f"cp.async.wait_group {v.stages - 1}")
        p("bar.warp.sync 0xffffffff")
        self.compute_block(cur, token0)
        p("bar.warp.sync 0xffffffff")  # every lane is done with this stage before it is refilled
        p.comment("advance: next block, next stages (wrapping)")
        p(f"add.s32 {issue_block}, {issue_block}, {v.warps}")
        p(f"add.s32 {issued}, {issued}, 1")
        p(f"add.s32 {token0}, {token0}, {v.warps * BS}")
        for stage in (fill, cur):
            p(f"add.u32 {stage}, {stage}, {v.stage}")
            p(f"setp.eq.u32 %p1, {stage}, {self.ring_end}")
            p(f"selp.u32 {stage}, {my_ring}, {stage}, %p1")
        p(f"add.s32 {j}, {j}, 1")
        p(f"setp.lt.s32 %p1, {j}, {mine}")
        p(f"@%p1 bra.uni {top}")
        p.label(done)
        p("cp.async.wait_group 0")

    def load_table_chunk(self, first: bool, issued: str | None = None):
        """Lane l loads the block id of this warp's block (issued + l): one coalesced load
        serves 32 copies (shuffled out by ``issue``). The first chunk is loaded at the very
        start, beside context_lens (it needs no context length: indices are clamped to the
        table row, and ids past the context are never used)."""
        p, v = self.p, self.v
        if first:
            bt = self.global_ptr("block_tables")
            seq64 = self.tmp("u64", "seq64")
            p(f"cvt.u64.u32 {seq64}, {self.seq}")
            p(f"mad.lo.s64 {bt}, {seq64}, {self.arg('block_table_row_bytes')}, {bt}")
            self.table, self.table_last = bt, self.tmp("s32", "table_last")
            p(f"ld.param.s32 {self.table_last}, [args+{_offset('table_len')}]")
            p(f"sub.s32 {self.table_last}, {self.table_last}, 1")
            self.table_chunk = self.tmp("s32", "table_chunk")
        idx, addr = self.tmp("s32", "table_idx"), self.tmp("u64", "table_addr")
        p(f"mad.lo.s32 {idx}, {self.lane}, {v.warps}, {self.warp}")
        if issued is not None:
            p(f"mad.lo.s32 {idx}, {issued}, {v.warps}, {idx}")
        p(f"min.s32 {idx}, {idx}, {self.table_last}")
        p(f"mul.wide.s32 {addr}, {idx}, 4")
        p(f"add.s64 {addr}, {addr}, {self.table}")
        p(f"ld.global.nc.s32 {self.table_chunk}, [{addr}]")

    def issue(self, issued: str, block_index: str, stage: str):
        """cp.async this warp's block number ``issued`` (the sequence's block
        ``block_index``: K tile, V tile, 8-bit: scales) into ``stage``; tokens past the
        context are zero-filled (src-size), so stale memory never reaches the MMAs."""
        p, v = self.p, self.v
        p.comment("copy block `issue_block` of the sequence into `fill_stage`; its id from the lanes' table chunk")
        pos, blk = self.tmp("s32", "chunk_pos"), self.tmp("s32", "block_id")
        p(f"and.b32 {pos}, {issued}, 31")
        loaded = p.new_label("chunk_ready")
        p(f"setp.ne.s32 %p1, {pos}, 0")
        p(f"setp.eq.or.s32 %p1, {issued}, 0, %p1")
        p(f"@%p1 bra.uni {loaded}")
        self.load_table_chunk(first=False, issued=issued)
        p.label(loaded)
        p(f"shfl.sync.idx.b32 {blk}, {self.table_chunk}, {pos}, 31, 0xffffffff")
        blk64 = self.tmp("s64", "block_id64")
        p(f"cvt.s64.s32 {blk64}, {blk}")
        valid = self.tmp("s32", "valid_tokens")  # min(16, context_len - 16 * block_index)
        p(f"shl.b32 {valid}, {block_index}, 4")
        p(f"sub.s32 {valid}, {self.ctx}, {valid}")
        p(f"min.s32 {valid}, {valid}, {BS}")
        k_src, v_src = self.tmp("u64", "k_src"), self.tmp("u64", "v_src")
        p(f"mad.lo.s64 {k_src}, {blk64}, {self.bases['k'][1]}, {self.bases['k'][0]}")
        p(f"mad.lo.s64 {v_src}, {blk64}, {self.bases['v'][1]}, {self.bases['v'][0]}")
        k_bytes = self.tmp("u32", "k_src_bytes")
        p(f"setp.lt.s32 %p1, {self.lane_tok}, {valid}")
        p(f"selp.u32 {k_bytes}, 16, 0, %p1")
        dst = self.tmp("u32", "cp_dst")
        copies = v.kv_tile // 512
        for i in range(copies):
            # lane copies chunk lane + 32 i: for 8-bit the dim chunk advances by 2 per copy
            p(f"add.u32 {dst}, {stage}, {self.k_dst}")
            p(f"cp.async.cg.shared.global.L2::cache_hint [{dst}+{512 * i}], [{k_src}+{512 * i}], 16, {k_bytes}, {self.stream_policy}")
        v_bytes = [self.tmp("u32", f"v_src_bytes{g}") for g in range(BS // v.x)]
        for g, reg in enumerate(v_bytes):  # token group g holds tokens x g .. x g + x - 1
            p(f"sub.s32 {reg}, {valid}, {v.x * g}")
            p(f"max.s32 {reg}, {reg}, 0")
            p(f"min.s32 {reg}, {reg}, {v.x}")
            if v.kv_bytes == 2:
                p(f"shl.b32 {reg}, {reg}, 1")
        p(f"add.u32 {dst}, {stage}, {v.kv_tile}")
        p(f"mad.lo.u32 {dst}, {self.lane}, 16, {dst}")
        for i in range(copies):
            group = (512 * i) // (HEAD * 16)  # chunk (lane + 32 i) is (group, dim)
            p(f"cp.async.cg.shared.global.L2::cache_hint [{dst}+{512 * i}], [{v_src}+{512 * i}], 16, {v_bytes[group]}, {self.stream_policy}")
        if v.eight_bit:
            src, n = self.tmp("u64", "scale_src"), self.tmp("u32", "scale_bytes")
            p(f"mad.lo.s64 {src}, {blk64}, {self.scale_block}, {self.scale_src}")
            p(f"selp.u32 {n}, 4, 0, %p1")
            p(f"add.u32 {dst}, {stage}, {2 * v.kv_tile}")
            p(f"mad.lo.u32 {dst}, {self.lane}, 4, {dst}")
            p(f"@{self.per_token} cp.async.ca.shared.global.L2::cache_hint [{dst}], [{src}], 4, {n}, {self.stream_policy}")

    def init_accumulators(self):
        p, v = self.p, self.v
        p.section("accumulators: O (per row tile, 16 dim tiles x 4), running max and sum per row")
        self.o = {}
        for mt in range(v.row_tiles):
            for dt in range(HEAD // 8):
                regs = [self.tmp("f32", f"o_m{mt}_d{dt}_{c}") for c in range(4)]
                for r in regs:
                    p(f"mov.f32 {r}, 0f00000000")
                self.o[mt, dt] = regs
        self.row_max, self.row_sum, self.row_ref = {}, {}, {}
        for mt in range(v.row_tiles):
            for h in range(2):
                self.row_max[mt, h] = self.tmp("f32", f"max_m{mt}_h{h}")
                self.row_sum[mt, h] = self.tmp("f32", f"sum_m{mt}_h{h}")
                p(f"mov.f32 {self.row_max[mt, h]}, {NEG_INF}")
                p(f"mov.f32 {self.row_sum[mt, h]}, 0f00000000")
                if v.eight_bit:  # the row's largest p * v_scale: O is kept in its units
                    self.row_ref[mt, h] = self.tmp("f32", f"ref_m{mt}_h{h}")
                    p(f"mov.f32 {self.row_ref[mt, h]}, {REF_FLOOR}")
        # per-lane ldmatrix offsets (bytes, relative to their tiles)
        self.q_lds = self.tmp("u32", "q_ldsm_lane")  # row lane % 16, dims (lane / 16) * 8
        t = self.tmp("u32", "ldsm_t")
        p(f"and.b32 {t}, {self.lane}, 15")
        p(f"mul.lo.u32 {self.q_lds}, {t}, {Q_STRIDE * 2}")
        p(f"shr.u32 {t}, {self.lane}, 4")
        p(f"mad.lo.u32 {self.q_lds}, {t}, 16, {self.q_lds}")
        p(f"add.u32 {self.q_lds}, {self.q_lds}, {self.smem}")
        mat, row = self.tmp("u32", "ldsm_mat"), self.tmp("u32", "ldsm_row")
        p(f"shr.u32 {mat}, {self.lane}, 3")
        p(f"and.b32 {row}, {self.lane}, 7")
        self.k_lds, self.v_lds = self.tmp("u32", "k_ldsm_lane"), self.tmp("u32", "v_ldsm_lane")
        if v.eight_bit:
            # K: matrix mat = (k-step ks + mat / 2, n-tile mat % 2): row 8 * (mat % 2) + row of chunk ks + mat / 2
            p(f"and.b32 {t}, {mat}, 1")
            p(f"mad.lo.u32 {self.k_lds}, {t}, 8, {row}")
            p(f"shr.u32 {t}, {mat}, 1")
            p(f"mad.lo.u32 {self.k_lds}, {t}, 16, {self.k_lds}")
            p(f"shl.b32 {self.k_lds}, {self.k_lds}, 4")
            # V: matrix mat = dim tile dq * 4 + mat: row = dim = lane (+ 32 dq)
            p(f"shl.b32 {self.v_lds}, {self.lane}, 4")
        else:
            # K: matrix mat = (dim chunk 2 ks + mat % 2, tokens 8 * (mat / 2) + row)
            p(f"and.b32 {t}, {mat}, 1")
            p(f"shl.b32 {t}, {t}, 4")
            p(f"shr.u32 {self.k_lds}, {mat}, 1")
            p(f"mad.lo.u32 {self.k_lds}, {self.k_lds}, 8, {row}")
            p(f"add.u32 {self.k_lds}, {self.k_lds}, {t}")
            p(f"shl.b32 {self.k_lds}, {self.k_lds}, 4")
            # V: matrix mat = (token group mat % 2, dim 8 * (mat / 2) + row)
            p(f"and.b32 {t}, {mat}, 1")
            p(f"shl.b32 {t}, {t}, 7")
            p(f"shr.u32 {self.v_lds}, {mat}, 1")
            p(f"mad.lo.u32 {self.v_lds}, {self.v_lds}, 8, {row}")
            p(f"add.u32 {self.v_lds}, {self.v_lds}, {t}")
            p(f"shl.b32 {self.v_lds}, {self.v_lds}, 4")
        p(f"add.u32 {self.v_lds}, {self.v_lds}, {v.kv_tile}")
        # the tokens of this lane's S columns: 16-bit (nt, e) -> 8 nt + 2 quad_col + e;
        # 8-bit -> 4 quad_col + 2 nt + e
        self.col_token = self.tmp("s32", "col_token_lane")
        p(f"shl.b32 {self.col_token}, {self.quad_col}, {2 if v.eight_bit else 1}")

    def column_offset(self, nt: int, e: int) -> int:
        return (2 * nt + e) if self.v.eight_bit else (8 * nt + e)

    def weigh_by_v_scale(self, cols: list[str], ref: str, alpha: str):
        """8-bit caches: a row's probabilities p -> fp16-safe weights p * v_scale / ref.
        ``ref`` is the row's largest p * v_scale so far (in units of the current max, so a
        moved max scales it by ``alpha``, and O, kept in units of ref, does not move).
        Weights are then at most 1 with the largest exactly representable, whatever the
        scales; O is rescaled only when ``ref`` grows: ``alpha`` becomes that factor."""
        p = self.p
        wmax, tmpf, cur = self.tmp("f32", "w_max"), self.tmp("f32", "shfl_tmp"), self.tmp("f32", "ref_cur")
        for i, c in enumerate(cols):  # column (nt, e) = i is token 4 quad_col + i
            p(f"mul.f32 {c}, {c}, {self.v_tok_scale[i]}")
        p(f"max.f32 {wmax}, {cols[0]}, {cols[1]}")
        p(f"max.f32 {wmax}, {wmax}, {cols[2]}")
        p(f"max.f32 {wmax}, {wmax}, {cols[3]}")
        for lane_mask in (1, 2):
            p(f"shfl.sync.bfly.b32 {tmpf}, {wmax}, {lane_mask}, 31, 0xffffffff")
            p(f"max.f32 {wmax}, {wmax}, {tmpf}")
        p(f"mul.f32 {cur}, {ref}, {alpha}")
        p(f"max.f32 {ref}, {cur}, {wmax}")
        p(f"max.f32 {ref}, {ref}, {REF_FLOOR}")  # a row that has seen nothing divides by 2^-100, not 0
        p(f"setp.eq.f32 %p3, {ref}, {cur}")
        p(f"rcp.approx.ftz.f32 {wmax}, {ref}")
        p(f"mul.f32 {alpha}, {cur}, {wmax}")
        p(f"selp.f32 {alpha}, 0f3F800000, {alpha}, %p3")
        for c in cols:
            p(f"mul.f32 {c}, {c}, {wmax}")

    def compute_block(self, stage: str, token0: str):
        p, v = self.p, self.v
        p.comment(f"S = Q K^T over the block's {BS} tokens: {HEAD // 16} k-steps, 2 n-tiles per row tile")
        s = {}
        for mt in range(v.row_tiles):
            for nt in range(2):
                s[mt, nt] = [self.tmp("f32", f"s_m{mt}_n{nt}_{c}") for c in range(4)]
        acc = s  # the int8 MMAs accumulate in s32 registers, converted into s after the k-steps
        if v.qk_s8:
            acc = {(mt, nt): [self.tmp("s32", f"si_m{mt}_n{nt}_{c}") for c in range(4)] for mt, nt in s}
        for regs in acc.values():
            for r in regs:
                p(f"mov.s32 {r}, 0" if v.qk_s8 else f"mov.f32 {r}, 0f00000000")
        a = [self.tmp("b32", f"a{i}") for i in range(4)]
        kb = [self.tmp("b32", f"kb{i}") for i in range(4)]
        addr = self.tmp("u32", "lds_addr")
        p(f"add.u32 {addr}, {stage}, {self.k_lds}")
        if v.qk_s8:
            p.comment("int8 Q and K as stored: kb[nt] and kb[2 + nt] are n-tile nt's dims 0-15 and 16-31 of a k32 step;")
            p.comment("S exact in s32, then one cvt per logit")
            for ks2 in range(HEAD // 32):
                p(f"ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{{', '.join(kb)}}}, [{addr}+{ks2 * 2 * BS * 16}]")
                for mt in range(v.row_tiles):
                    p(f"ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{{', '.join(a)}}}, [{self.q_lds}+{mt * 16 * Q_STRIDE * 2 + ks2 * 32}]")
                    for nt in range(2):
                        self.mma(acc[mt, nt], a, [kb[nt], kb[2 + nt]], int8=True)
            for key, regs in s.items():
                for r, i in zip(regs, acc[key]):
                    p(f"cvt.rn.f32.s32 {r}, {i}")
        elif v.eight_bit:
            wide = [self.tmp("b32", f"kw{i}") for i in range(4)]  # widened one k-step at a time
            for ks2 in range(HEAD // 32):
                p(f"ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{{', '.join(kb)}}}, [{addr}+{ks2 * 2 * BS * 16}]")
                for half in range(2):
                    for nt in range(2):
                        self.widen(kb[2 * half + nt], wide[2 * nt], wide[2 * nt + 1])
                    ks = 2 * ks2 + half
                    for mt in range(v.row_tiles):
                        p(f"ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{{', '.join(a)}}}, [{self.q_lds}+{mt * 16 * Q_STRIDE * 2 + ks * 32}]")
                        for nt in range(2):
                            self.mma(s[mt, nt], a, [wide[2 * nt], wide[2 * nt + 1]])
        else:
            for ks in range(HEAD // 16):
                p(f"ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{{', '.join(kb)}}}, [{addr}+{ks * 2 * BS * 16}]")
                for mt in range(v.row_tiles):
                    p(f"ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{{', '.join(a)}}}, [{self.q_lds}+{mt * 16 * Q_STRIDE * 2 + ks * 32}]")
                    self.mma(s[mt, 0], a, kb[0:2])
                    self.mma(s[mt, 1], a, kb[2:4])

        if v.eight_bit:
            p.comment("this lane's tokens 4 quad_col .. +3: their K and V scales (per-token caches)")
            sc = self.tmp("u32", "scale_lds")
            p(f"mad.lo.u32 {sc}, {self.quad_col}, 16, {stage}")
            p(f"@{self.per_token} ld.shared.v4.f32 {{{', '.join(self.k_tok_scale)}}}, [{sc}+{2 * v.kv_tile}]")
            p(f"@{self.per_token} ld.shared.v4.f32 {{{', '.join(self.v_tok_scale)}}}, [{sc}+{2 * v.kv_tile + 64}]")
        p.comment("scale to log2 units, mask tokens a row does not see, online softmax per row")
        tok, tok_e = self.tmp("s32", "tok_lane"), self.tmp("s32", "tok")
        p(f"add.s32 {tok}, {token0}, {self.col_token}")
        factor = {}
        for nt in range(2):
            for e in range(2):
                if v.eight_bit:
                    f = self.tmp("f32", f"logit_scale{nt}{e}")
                    p(f"mul.f32 {f}, {self.qk_scale}, {self.k_tok_scale[2 * nt + e]}")
                    factor[nt, e] = f
                else:
                    factor[nt, e] = self.qk_scale
        for mt in range(v.row_tiles):
            for nt in range(2):
                for e in range(2):
                    p(f"add.s32 {tok_e}, {tok}, {self.column_offset(nt, e)}")
                    for h in range(2):
                        r = s[mt, nt][2 * h + e]
                        p(f"setp.lt.s32 %p3, {tok_e}, {self.limit[mt, h]}")
                        p(f"mul.f32 {r}, {r}, {factor[nt, e]}")
                        p(f"selp.f32 {r}, {r}, {NEG_INF}, %p3")
        bmax, tmpf = self.tmp("f32", "block_max"), self.tmp("f32", "shfl_tmp")
        shift = self.tmp("f32", "shift")
        alphas = [self.tmp("f32", f"alpha{h}") for h in range(2)]
        for mt in range(v.row_tiles):
            for h in range(2):
                alpha = alphas[h]
                cols = [s[mt, nt][2 * h + e] for nt in range(2) for e in range(2)]
                p(f"max.f32 {bmax}, {cols[0]}, {cols[1]}")
                p(f"max.f32 {bmax}, {bmax}, {cols[2]}")
                p(f"max.f32 {bmax}, {bmax}, {cols[3]}")
                for lane_mask in (1, 2):
                    p(f"shfl.sync.bfly.b32 {tmpf}, {bmax}, {lane_mask}, 31, 0xffffffff")
                    p(f"max.f32 {bmax}, {bmax}, {tmpf}")
                mx, sm = self.row_max[mt, h], self.row_sum[mt, h]
                p(f"max.f32 {bmax}, {bmax}, {mx}")
                p.comment("a row that has seen nothing keeps -inf: shift by 0 so exp2 gives 0, not NaN")
                p(f"setp.eq.f32 %p3, {bmax}, {NEG_INF}")
                p(f"selp.f32 {shift}, 0f00000000, {bmax}, %p3")
                p(f"sub.f32 {alpha}, {mx}, {shift}")
                p(f"ex2.approx.ftz.f32 {alpha}, {alpha}")
                p(f"selp.f32 {alpha}, 0f3F800000, {alpha}, %p3")  # and O stays (rows past the group)
                p(f"mov.f32 {mx}, {bmax}")
                p(f"mul.f32 {sm}, {sm}, {alpha}")
                for c in cols:
                    p(f"sub.f32 {c}, {c}, {shift}")
                    p(f"ex2.approx.ftz.f32 {c}, {c}")
                    p(f"add.f32 {sm}, {sm}, {c}")
                if v.eight_bit:
                    self.weigh_by_v_scale(cols, self.row_ref[mt, h], alpha)
            p.comment("rescale O unless no row's " + ("largest weight" if v.eight_bit else "max") + " moved in the whole warp (the common case late in a context)")
            skip = p.new_label("rescale_done")
            p(f"setp.eq.f32 %p3, {alphas[0]}, 0f3F800000")
            p(f"setp.eq.and.f32 %p3, {alphas[1]}, 0f3F800000, %p3")
            p("vote.sync.all.pred %p3, %p3, 0xffffffff")
            p(f"@%p3 bra.uni {skip}")
            for dt in range(HEAD // 8):
                for c in range(4):
                    r = self.o[mt, dt][c]
                    p(f"mul.f32 {r}, {r}, {alphas[c // 2]}")
            p.label(skip)

        p.comment("O += P V: S's accumulators are P's A fragments")
        pa = {mt: [self.tmp("b32", f"p_m{mt}_{i}") for i in range(4)] for mt in range(v.row_tiles)}
        for mt in range(v.row_tiles):
            for nt in range(2):
                for h in range(2):
                    self.pack(pa[mt][2 * nt + h], s[mt, nt][2 * h], s[mt, nt][2 * h + 1], v.mma_type)
        vb = [self.tmp("b32", f"vb{i}") for i in range(4)]
        p(f"add.u32 {addr}, {stage}, {self.v_lds}")
        if v.eight_bit:
            wide = [self.tmp("b32", f"vw{i}") for i in range(2)]  # widened one dim tile at a time
            for dq in range(HEAD // 32):
                p(f"ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{{', '.join(vb)}}}, [{addr}+{dq * 512}]")
                for i in range(4):
                    self.widen(vb[i], wide[0], wide[1])
                    for mt in range(v.row_tiles):
                        self.mma(self.o[mt, 4 * dq + i], pa[mt], wide)
        else:
            for dp in range(HEAD // 16):
                p(f"ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{{', '.join(vb)}}}, [{addr}+{dp * 256}]")
                for mt in range(v.row_tiles):
                    self.mma(self.o[mt, 2 * dp], pa[mt], vb[0:2])
                    self.mma(self.o[mt, 2 * dp + 1], pa[mt], vb[2:4])

    def merge_and_store(self):
        p, v = self.p, self.v
        R = v.rows
        p.section("phase 4: merge the warps' (max, sum, O) through shared memory (the ring is free)")
        tmpf = self.tmp("f32", "shfl_tmp")
        for key, sm in self.row_sum.items():
            for lane_mask in (1, 2):
                p(f"shfl.sync.bfly.b32 {tmpf}, {sm}, {lane_mask}, 31, 0xffffffff")
                p(f"add.f32 {sm}, {sm}, {tmpf}")
        p("bar.sync 0")
        W = v.warps
        merge_o = self.ring  # [W][R][O_STRIDE] f32
        merge_max = self.tmp("u32", "merge_max")  # [W][R] f32
        merge_sum = self.tmp("u32", "merge_sum")
        p(f"add.u32 {merge_max}, {merge_o}, {W * R * O_STRIDE * 4}")
        p(f"add.u32 {merge_sum}, {merge_max}, {W * R * 4}")
        row, addr = self.tmp("u32", "mg_row"), self.tmp("u32", "mg_addr")
        p(f"mad.lo.u32 {row}, {self.warp}, {R}, {self.quad_row}")  # this lane's row 0 in the warp's slab
        p(f"setp.eq.u32 %p1, {self.quad_col}, 0")
        for mt in range(v.row_tiles):
            for h in range(2):
                off = (16 * mt + 8 * h) * 4
                p(f"mad.lo.u32 {addr}, {row}, 4, {merge_max}")
                p(f"@%p1 st.shared.f32 [{addr}+{off}], {self.row_max[mt, h]}")
                p(f"mad.lo.u32 {addr}, {row}, 4, {merge_sum}")
                p(f"@%p1 st.shared.f32 [{addr}+{off}], {self.row_sum[mt, h]}")
        p(f"mad.lo.u32 {addr}, {row}, {O_STRIDE * 4}, {merge_o}")
        p(f"mad.lo.u32 {addr}, {self.quad_col}, 8, {addr}")
        for mt in range(v.row_tiles):
            for dt in range(HEAD // 8):
                for h in range(2):
                    off = ((16 * mt + 8 * h) * O_STRIDE + 8 * dt) * 4
                    o = self.o[mt, dt]
                    if v.eight_bit:  # from units of the row's largest weight back to those of its max
                        for c in o[2 * h:2 * h + 2]:
                            p(f"mul.f32 {c}, {c}, {self.row_ref[mt, h]}")
                    p(f"st.shared.v2.f32 [{addr}+{off}], {{{o[2 * h]}, {o[2 * h + 1]}}}")
        p("bar.sync 0")

        p.comment("per row (thread m < rows): merged max and sum; each warp's weight")
        p.comment("exp2(max_w - max) / sum (x the per-tensor V scale) replaces its max")
        skip = p.new_label("weights_done")
        p(f"setp.ge.u32 %p1, {self.tid}, {R}")
        p(f"@%p1 bra {skip}")
        mx, tot, shift, t = (self.tmp("f32", n) for n in ("mg_max", "mg_total", "mg_shift", "mg_t"))
        wmax = [self.tmp("f32", f"mg_wmax{w}") for w in range(W)]
        wsum = self.tmp("f32", "mg_wsum")
        p(f"mad.lo.u32 {addr}, {self.tid}, 4, {merge_max}")
        for w in range(W):
            p(f"ld.shared.f32 {wmax[w]}, [{addr}+{w * R * 4}]")
        p(f"max.f32 {mx}, {wmax[0]}, {wmax[1]}")
        for w in range(2, W):
            p(f"max.f32 {mx}, {mx}, {wmax[w]}")
        p(f"setp.eq.f32 %p3, {mx}, {NEG_INF}")
        p(f"selp.f32 {shift}, 0f00000000, {mx}, %p3")
        p(f"mov.f32 {tot}, 0f00000000")
        sum_addr = self.tmp("u32", "mg_sum_addr")
        p(f"mad.lo.u32 {sum_addr}, {self.tid}, 4, {merge_sum}")
        for w in range(W):
            p(f"sub.f32 {wmax[w]}, {wmax[w]}, {shift}")
            p(f"ex2.approx.ftz.f32 {wmax[w]}, {wmax[w]}")
            p(f"ld.shared.f32 {wsum}, [{sum_addr}+{w * R * 4}]")
            p(f"fma.rn.f32 {tot}, {wsum}, {wmax[w]}, {tot}")
        p.comment("total >= 1 for a row that saw a token; rows that saw none get weight 0")
        p(f"max.f32 {t}, {tot}, 0f0DA24260")  # 1e-30
        p(f"rcp.rn.f32 {t}, {t}")
        if v.eight_bit:
            v_scale = self.tmp("f32", "v_tensor_scale")
            p(f"mov.f32 {v_scale}, 0f3F800000")
            p(f"@!{self.per_token} ld.global.nc.f32 {v_scale}, [{self.global_ptr('v_scale')}]")
            p(f"mul.f32 {t}, {t}, {v_scale}")
        for w in range(W):
            p(f"mul.f32 {wmax[w]}, {wmax[w]}, {t}")
            p(f"st.shared.f32 [{addr}+{w * R * 4}], {wmax[w]}")
        p.label(skip)
        p("bar.sync 0")

        p.section("phase 5: out[row, head, :] = sum over warps of weight_w * O_w, in the query dtype")
        word, m0, m = self.tmp("u32", "q_word"), self.tmp("u32", "q_row0"), self.tmp("u32", "q_m")
        acc = [self.tmp("f32", f"out_acc{i}") for i in range(2)]
        ov = [self.tmp("f32", f"out_part{i}") for i in range(2)]
        wgt = self.tmp("f32", "out_weight")
        packed = self.tmp("b32", "out_packed")
        word_bytes = self.tmp("u64", "q_word_bytes")
        for r in range(R * (HEAD // 2) // v.threads):
            p(f"add.u32 {m}, {m0}, {v.threads // 64 * r}")
            out_addr = self.row_address(m, self.out_ptr, self.out_row, self.out_head, "o")
            p(f"add.s64 {out_addr}, {out_addr}, {word_bytes}")
            p(f"mad.lo.u32 {addr}, {m}, {O_STRIDE * 4}, {merge_o}")
            p(f"mad.lo.u32 {addr}, {word}, 8, {addr}")
            wa = self.tmp("u32", "out_weight_addr")
            p(f"mad.lo.u32 {wa}, {m}, 4, {merge_max}")
            for i in range(2):
                p(f"mov.f32 {acc[i]}, 0f00000000")
            for w in range(W):
                p(f"ld.shared.f32 {wgt}, [{wa}+{w * R * 4}]")
                p(f"ld.shared.v2.f32 {{{ov[0]}, {ov[1]}}}, [{addr}+{w * R * O_STRIDE * 4}]")
                for i in range(2):
                    p(f"fma.rn.f32 {acc[i]}, {ov[i]}, {wgt}, {acc[i]}")
            self.pack(packed, acc[0], acc[1], v.q)
            p(f"@%p1 st.global.b32 [{out_addr}], {packed}")


def _offset(name: str) -> int:
    return next(o for n, _, o in ARGS if n == name)


P_WEIGHTS = """; P x per-token V scale, divided by the
                        row's largest such weight so far, first (O is kept in its units)"""


def header_comment(v: Variant) -> str:
    kv = DTYPE_NAMES[v.kv]
    eight = v.eight_bit
    qk_steps = f"{HEAD // 32} int8 k32-steps x 2 n-tiles" if v.qk_s8 else f"{HEAD // 16} k-steps x 2 n-tiles"
    lines = f"""
{v.name}: single-pass paged-attention decode for sm_90 (pa_hybrid "asm" backend).
Generated by asm/generate.py from one template; edit that, then run it.

Query {DTYPE_NAMES[v.q]}, KV cache {kv} in the shuffled layout
    K [num_blocks, num_kv_heads, {HEAD}/{v.x}, {BS}, {v.x}]   V [num_blocks, num_kv_heads, {BS}/{v.x}, {HEAD}, {v.x}],
head size {HEAD}, block size {BS}, up to {v.rows} query rows per kv head (gqa * max_qlen <= {v.rows};
row m = i * gqa + g is new token i of the sequence, group member g).

Algorithm. Grid (num_seqs, num_kv_heads), {v.threads} threads = {v.warps} warps. One CTA walks
the whole context of one sequence once for one kv head and serves all query rows of
the group with mma.sync.m16n8k16 ({v.row_tiles} row tile(s) of 16; absent rows are zero
and never stored). No scratch, one launch.
  1. The context's cache blocks are dealt round-robin to the warps (warp w: blocks
     w, w+{v.warps}, ...). Each warp streams its blocks through a private {v.stages}-stage ring:
     16-byte cp.async copies of the block's K tile and V tile{" and its 16+16 per-token scales" if eight else ""}
     as stored ({v.stage} bytes per stage), under an L2 evict-first policy on calls that the
     launcher flags (stream_evict_first), else the normal one; tokens past the context
     are zero-filled by the copy's src-size, so no stale value (NaN * 0) reaches an MMA.
     Per block:
       S = Q K^T        ldmatrix.x4 of Q (A) and K (B) fragments, {qk_steps}
       softmax          S * scale*log2(e) (x per-token K scale), masked past each row's
                        visible length (causal with max_qlen > 1), running max/sum per
                        row in base 2, O rescaled by exp2(old max - new max)
       O += P V         P packed to {DTYPE_NAMES[v.mma_type]} from S's accumulators (its A fragments),
                        V's B fragments by ldmatrix.x4{P_WEIGHTS if eight else ""}
     Each warp's first {v.stages - 1} copies are issued before step 2, so they overlap it.
     Block ids: lane l of a warp holds the id of the warp's block 32 k + l (one coalesced
     load per 32 blocks, shuffled out per copy); the first chunk is loaded beside
     context_lens at the start (indices clamped to the table row, table_len).
  2. Q rows -> shared memory (pitch {Q_STRIDE} elements), one barrier.
  3. The warps' (max, sum, O) meet in shared memory (the ring, reused); thread m
     computes row m's weights exp2(max_w - max) / sum; all threads sum the weighted
     O_w and store out in the query dtype.

Layouts feed ldmatrix without transposes:
  K: the 16 bytes of (dim chunk, token) are one row of an 8x8 B matrix (k = dims, n = tokens).
  V: the 16 bytes of (token group, dim) are one row of an 8x8 B matrix (k = tokens, n = dims).""".strip("\n")
    if v.qk_s8:
        q_order = "the widening kernels store Q's dims\n  permuted (Q K^T here takes K's bytes as they are and Q's dims in order)"
        precision_text = """high_precision 0 only (1 and 2 run the widening
  kernel): Q K^T runs on int8 MMAs (m16n8k32.s8, s32 accumulators, exact) on K's ldmatrix
  registers as stored (kb[nt] and kb[2 + nt]: n-tile nt's dims 0-15 and 16-31 of a k32
  step), Q rounded to int8 after one power-of-two scale per CTA that puts the largest
  |q| in [64, 128) (the logit scale takes its inverse); S converts to f32 once per logit.
  V widens exactly to fp16 (int8 by the magic number 1024) and P V runs in fp16 with
  fp32 accumulators."""
    else:
        q_order = "Q's dims within each 16-dim chunk are stored\n  permuted in shared memory"
        levels = "0, 1 and 2 all run" if v.kv == "e4m3" else "1 and 2 run (0: the _qks8_ kernel,\n  Q K^T in int8)"
        precision_text = f"""high_precision {levels} this kernel: nothing is computed in
  8-bit. K and V widen exactly to fp16 (one cvt per e4m3 pair; int8 by the magic
  number 1024) and both MMAs run in fp16 with fp32 accumulators, whatever the query
  dtype: bf16 queries are stored as fp16 after one power-of-two scale per CTA that puts
  the largest |q| in [2^14, 2^15) (the logit scale takes its inverse)."""
    if eight:
        lines += f"""
  8-bit: an ldmatrix row is 16 one-byte values, and lane (4 g + t) receives bytes
  4t..4t+3 of row g: dims 4t..4t+3 of one token (K) or tokens 4t..4t+3 of one dim (V).
  Widened (exact) they form B fragments whose k order is permuted: k slots (2t, 2t+1)
  hold elements 4t, 4t+1 and slots (2t+8, 2t+9) hold 4t+2, 4t+3. The same permutation
  is applied to the other operand: {q_order},
  and K's tokens are placed so that S's n-tile 0 columns
  (2t, 2t+1) are tokens 4t, 4t+1 and n-tile 1's are 4t+2, 4t+3 (token tok is copied to
  row 8 (tok/2 % 2) + 2 (tok/4) + tok % 2 of its chunk: each n-tile's rows are adjacent,
  so ldmatrix is free of bank conflicts; the K copies are not, at 4x their ideal
  shared-memory wavefronts, but a placement free of both was no faster: RESULTS.md
  section 41). P's A fragments then match V's B fragments.
  Scales: per-token (K_QScale_asm/V_QScale_asm [num_blocks, num_kv_heads, 16] fp32) or
  per-tensor (per_token_scales = 0: K's scale multiplies the logit scale, V's the final
  weights). {precision_text} The weights
  p * v_scale are divided by their row's running largest one, so they are at most 1
  and none that matters is subnormal in fp16 for any scales."""
    regs = f"""

Registers per lane: O {v.row_tiles} x 16 dim tiles x 4 f32, S {v.row_tiles} x 2 n-tiles x 4 f32, running
max/sum for its two rows per tile, fragments (a*, kb*/vb*, p_*), copy and ldmatrix offsets.
Shared memory ({v.smem_bytes} bytes, dynamic): [Q {v.q_bytes}][ring {v.warps} warps x {v.stages} stages x {v.stage}],
the ring later reused as [O: {v.warps} x {v.rows} x {O_STRIDE} f32][max: {v.warps} x {v.rows}][sum: {v.warps} x {v.rows}].

Argument block (one .param of {ARGS_BYTES} bytes; pointers are device addresses, strides
are in bytes):"""
    args = "".join(f"\n  +{o:<3} {k:<3} {n}" for n, k, o in ARGS)
    notes = """
  scale_log2 = softmax scale * log2(e); k_scale/v_scale: per-token scale tensors or
  1-element per-tensor scales (8-bit caches; unused otherwise); qo_indptr read when
  max_qlen > 1; a context longer than max_seq_len counts as max_seq_len tokens."""
    text = lines + regs + args + notes
    return "\n".join("// " + line if line else "//" for line in text.split("\n")) + "\n"


MANIFEST_FIELDS = [
    "q_dtype", "kv_dtype", "max_gqa", "max_qlen", "max_rows", "mask", "precision",
    "block_size", "head_size", "file", "entry", "threads", "shared_bytes",
]


def manifest() -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, MANIFEST_FIELDS, lineterminator="\n")
    writer.writeheader()
    for v in VARIANTS:
        writer.writerow({
            "q_dtype": DTYPE_NAMES[v.q], "kv_dtype": DTYPE_NAMES[v.kv], "max_gqa": v.rows, "max_qlen": v.rows,
            "max_rows": v.rows, "mask": "causal", "precision": v.precision, "block_size": BS,
            "head_size": HEAD, "file": v.file, "entry": v.name, "threads": v.threads,
            "shared_bytes": v.smem_bytes,
        })
    return out.getvalue()


def outputs() -> dict[str, str]:
    files = {v.file: Kernel(v).render() for v in VARIANTS}
    files["manifest.csv"] = manifest()
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed files are out of date")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    stale = []
    for name, text in outputs().items():
        path = args.out / name
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print("out of date (run python asm/generate.py):", ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
