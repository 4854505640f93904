// Split-KV paged decode, stage 1: the "hip" backend's kernel (one source for CUDA and HIP;
// every platform construct is in compat.cuh).
//
// Grid (partitions, kv heads x row blocks, sequences); one CTA walks `partition_size` tokens (a
// multiple of 256) of one sequence for one kv head. Or, in the BALANCED entry, the balanced
// schedule: grid (CTAs per kv head, kv heads x row blocks), each CTA an equal share of the kv
// head's 256-token pages, one span per sequence they touch. The group's gqa * max_qlen query rows
// (row m = i * gqa + g is new token i, group member g) are cut into `row_blocks` blocks of ROWS
// (16 or 32), one CTA each (each reads the span's K and V); a span serves its block's rows at
// once: they form the M dim of ROWS / 16 mma.sync m16n8k16 tiles, which share every K and V
// fragment (rows past the group are masked). GQA and qlen are run-time values, so one variant
// per (dtypes, head size, block size, width, ROWS) serves all.
//
// Work split: the CTA's cache blocks are dealt round-robin to its warps (twice as many in
// the WIDE variant, for tiny grids, where one CTA's latency is the call's: each warp then
// has half the blocks, all in flight at once); each warp streams
// its blocks through a private STAGES-deep ring of shared memory with 16-byte cp.async
// copies (one stage = one cache block's K tile and V tile, copied as stored), keeps its own
// online softmax, and the warps merge through shared memory at the end. So the main loop
// needs no CTA-wide barrier.
//
// The shuffled layouts feed the tensor cores without transposes:
//   K [HEAD/X][BS][X]: the 16 bytes of (dim chunk c, token t) are row t of an 8x8 B-matrix
//                      of S = Q K^T (k = dims, n = tokens): ldmatrix, rows contiguous.
//   V [BS/X][HEAD][X]: the 16 bytes of (token group g, dim d) are row d of an 8x8 B-matrix
//                      of O = P V (k = tokens, n = dims): ldmatrix again.
// 8-bit caches (X = 16): the same rows hold 16 one-byte values, widened in registers
// (compat.cuh's widen2 / widen4) into the B fragments of the query type. e4m3 takes each
// fragment register from one 2-byte shared load (bytes 2t, 2t+1 and 2t+8, 2t+9 of row g for
// lane 4 g + t), in natural k order. int8 takes a fragment pair from one 4-byte load (bytes
// 4t..4t+3, as ldmatrix would deliver them) whose k order is permuted: k slots (2t, 2t+1)
// hold elements 4t, 4t+1 and slots (2t+8, 2t+9) hold 4t+2, 4t+3. The other operand follows:
// Q K^T's k is the head dim, so Q's dims sit in that order in shared memory (q_word_slot);
// P V's k is the token, so K's tokens are placed in the ring so that S's columns come out
// in it (k_ring_row), and P's A fragments, taken from S's accumulators as for 16-bit
// caches, match V's B fragments. The word loads halve int8's loads and its conversions
// (sign extension in place, by shifts); for e4m3 they saved no instruction and took 3-9%
// more time (H100, RESULTS 28). (ldmatrix_x4, a quarter of the loads, spilled in variants
// at the edge of the register file.) Per-tensor scales fold into the softmax scale (K)
// and the final normalization (V); per-token scales ride in each ring stage behind the V
// tile: K's multiplies its logit column after Q K^T, V's folds into P before P V (the
// softmax sum stays unscaled).
//
// Output: the partial format of pa_hybrid/kernels/reduce.py (max_logits in natural-log
// units, exp_sums, normalized tmp_out), or `out` itself for a sequence that one CTA holds
// whole (static: one partition; balanced: one CTA's pages), which stage 2 then leaves alone;
// when one partition covers every context (write_out), stage 2 is skipped.
#include "compat.cuh"

namespace pa {

// One launch's arguments, passed by value. Field order and types are mirrored by
// pa_hybrid/backends/hip.py (SplitKvParams); tests/test_hip_backend.py checks sizes and offsets.
struct SplitKvParams {
  void* out;                // [rows, num_heads, HEAD], query dtype
  float* exp_sums;          // [rows, num_heads, max_partitions]
  float* max_logits;        // same shape and strides as exp_sums
  void* tmp_out;            // [rows, num_heads, max_partitions, HEAD], tmp_kind dtype
  const void* q;            // [rows, num_heads, HEAD], last dim contiguous
  const void* k;            // [num_blocks, num_kv_heads, HEAD / X, BS, X]
  const void* v;            // [num_blocks, num_kv_heads, BS / X, HEAD, X]
  const float* k_scale;     // 8-bit caches only: 1 element, or per token
  const float* v_scale;     //   [num_blocks, num_kv_heads, BS] (the same strides as k_scale)
  const int* block_tables;  // [num_seqs, table_width]
  const int* context_lens;  // [num_seqs]
  const int* qo_indptr;     // [num_seqs + 1], read when max_qlen > 1
  float scale_log2;         // softmax scale * log2(e)
  int partition_size;       // tokens per CTA, a multiple of 256
  int write_out;            // 1: one partition covers max_seq_len; write out, no partials
  int tmp_kind;             // tmp_out dtype: 0 fp32, 1 bf16, 2 fp16
  int gqa;                  // query heads per kv head
  int max_qlen;             // new tokens per sequence at most; gqa * max_qlen <= row_blocks * ROWS
  i64 stride_q_row, stride_q_head;
  i64 stride_out_row, stride_out_head;
  i64 stride_es_row, stride_es_head;
  i64 stride_tmp_row, stride_tmp_head, stride_tmp_part;
  i64 stride_k_block, stride_k_head;  // in elements
  i64 stride_v_block, stride_v_head;
  i64 stride_bt;
  i64 stride_scale_block, stride_scale_head;  // per-token scales, in elements
  int per_token_scales;                       // 8-bit caches: 1 per-token, 0 per-tensor scales
  int table_width;                            // block-table entries per sequence (its shape[1])
  int num_seqs;     // the balanced schedule only
  int max_seq_len;  // longer contexts count as this long: the table row and scratch cover no more
  int stream_evict_first;  // 1: read K/V under an L2 evict-first policy, 0: the normal one
  int row_blocks;          // CTAs per kv head along the query rows: blockIdx.y = kv_head * row_blocks + block
};

// The merge's floats per row of O: the pad of 8 puts the rows that a warp's lanes store
// (8 rows, 4 dim pairs each) on distinct banks; unpadded, its stores were 8-way conflicts.
constexpr int merge_stride(int head) { return head + 8; }

// A CTA's shared memory: the query rows (padded), then each warp's ring, which the merge
// reuses for O, max and sum per warp and row.
constexpr int split_kv_smem_bytes(int warps, int ring_per_warp, int head, int rows) {
  const int q = rows * (head + 8) * 2, ring = warps * ring_per_warp, merge = warps * rows * (merge_stride(head) + 2) * 4;
  return q + (ring > merge ? ring : merge);
}
constexpr int split_kv_fit_warps(int warps, int ring_per_warp, int head, int rows) {
  return warps > 1 && split_kv_smem_bytes(warps, ring_per_warp, head, rows) > SMEM_PER_CTA
             ? split_kv_fit_warps(warps / 2, ring_per_warp, head, rows)
             : warps;
}

template <bool IS_BF16, int KV_KIND, int HEAD, int BS, bool WIDE, int ROWS>
struct SplitKvConfig {  // restated by hip.py's kernel_config; the same test checks both agree
  static constexpr int M_TILES = ROWS / 16;  // 16-row MMA tiles of query rows
  static constexpr int KV_BYTES = KV_KIND == KV_16BIT ? 2 : 1;
  static constexpr int X = 16 / KV_BYTES;
  static constexpr int KV_TILE = HEAD * BS * KV_BYTES;  // one cache block of K (or of V)
  static constexpr int SCALES = KV_KIND == KV_16BIT ? 0 : BS * 4;  // one block's per-token K (or V) scales
  static constexpr int STAGE = 2 * KV_TILE + 2 * SCALES;
  // Async copies overlap the next blocks with this one's math; plain copies gain nothing
  // from a deeper ring than one stage.
  static constexpr int STAGES = !ASYNC_COPIES ? 1 : 2 * KV_TILE <= 8192 ? 3 : 2;
  static constexpr int Q_STRIDE = HEAD + 8;  // elements; the pad spreads ldmatrix rows over banks
  static constexpr int Q_BYTES = ROWS * Q_STRIDE * 2;  // as split_kv_smem_bytes counts it
  static constexpr int MERGE_STRIDE = merge_stride(HEAD);
  // 2 CTAs per SM within sm_90's 227 KB: fewer warps for big tiles (WIDE: one CTA, twice
  // the warps); then halved while the tiles exceed one CTA's shared memory (gfx942: 64 KB).
  static constexpr int WARPS = split_kv_fit_warps((2 * KV_TILE >= 32768 ? 2 : 4) * (WIDE ? 2 : 1), STAGES * STAGE, HEAD, ROWS);
  static constexpr int THREADS = 32 * WARPS;
  static constexpr int SMEM_BYTES = split_kv_smem_bytes(WARPS, STAGES * STAGE, HEAD, ROWS);
  static constexpr int NT = BS / 8;  // n-tiles of S per block
  // int8: a fragment pair per 4-byte shared load, k order permuted (see the header)
  static constexpr bool PERMUTED_K = KV_KIND == KV_INT8;
  static_assert(HEAD % 16 == 0 && BS % 16 == 0 && BS % X == 0, "unsupported head/block size");
  static_assert(ROWS == 16 || ROWS == 32, "one or two 16-row MMA tiles");
  static_assert(KV_TILE % 512 == 0, "a warp copies tiles in 512-byte steps");
  static_assert(SMEM_BYTES <= SMEM_PER_CTA, "more shared memory than one CTA may have");
};

// int8 caches: the ring row of token u of a K tile's dim chunk (rows of a 16-token group
// stay in the group), so that column pair (2t, 2t+1) of S's n-tile 2h + s holds tokens
// 16 h + 4t + 2s and +1 (column_token in decode_span). The copies of a 128-byte line then
// write rows 8 apart, which share banks; rows free of that conflict were no faster (RESULTS 41).
constexpr int k_ring_row(int u) { return (u & ~15) + 8 * ((u >> 1) & 1) + 2 * ((u & 15) >> 2) + (u & 1); }
// int8 caches: the shared-memory word (2 dims) of the query's word w (dims 2w, 2w + 1): in
// each 16-dim chunk, dims 4t, 4t+1 go to word t and dims 4t+2, 4t+3 to word 4 + t.
constexpr int q_word_slot(int w) { return (w & ~7) + ((w & 1) ? 4 : 0) + ((w & 7) >> 1); }

// 8-bit caches: lane's B fragment pair from its row of 16 bytes (row g = lane / 4 of the 8)
template <class C, int KV_KIND, bool IS_BF16>
__device__ __forceinline__ void widened_pair(const unsigned char* row, int lane, unsigned& b0, unsigned& b1) {
  if constexpr (C::PERMUTED_K) {
    widen4<KV_KIND, IS_BF16>(*reinterpret_cast<const unsigned*>(row + (lane % 4) * 4), b0, b1);
  } else {
    b0 = widen2<KV_KIND, IS_BF16>(*reinterpret_cast<const unsigned short*>(row + (lane % 4) * 2));
    b1 = widen2<KV_KIND, IS_BF16>(*reinterpret_cast<const unsigned short*>(row + 8 + (lane % 4) * 2));
  }
}

// The CTA's dynamic shared memory: ROWS query rows, then the rings (see split_kv_smem_bytes).
extern __shared__ __align__(128) unsigned char smem[];

// Where a span's result goes: `out` (write_out) or the partial of slot `part`; last_span:
// the CTA's last span (the reduce may launch after its cache reads).
struct SpanTail {
  int part;
  bool write_out, last_span;
};

// Attends query rows [row_base, row_base + ROWS) of (seq, kv_head) to tokens [start, end)
// (start block aligned) and writes what tail() says; an empty span writes zeros, or returns
// at once if skip_empty (a static partition past its context, whose partial the reduce never
// reads). tail() is called after the cache reads, so that the balanced schedule's values need
// no registers through them.
// Called by every thread of the CTA; the caller syncs before the next span reuses shared memory.
template <bool IS_BF16, int KV_KIND, int HEAD, int BS, bool WIDE, int ROWS, class Tail>
__device__ __forceinline__ void decode_span(const SplitKvParams& p, int seq, int kv_head, int row_base, int context_len,
                                            int start, int end, bool skip_empty, const Tail& tail) {
  using C = SplitKvConfig<IS_BF16, KV_KIND, HEAD, BS, WIDE, ROWS>;
  using Q = q16<IS_BF16>;
  using qt = typename Q::t;
  constexpr float LN2 = 0.6931471805599453f;
  constexpr int MT = C::M_TILES;
  qt* q_s = reinterpret_cast<qt*>(smem);  // [ROWS][Q_STRIDE]
  unsigned char* ring = smem + C::Q_BYTES;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int gqa = p.gqa, rows = p.gqa * p.max_qlen;
  int first_row = seq, num_new = 1;
  if (p.max_qlen > 1) {
    first_row = p.qo_indptr[seq];
    num_new = p.qo_indptr[seq + 1] - first_row;
  }
  const int block_begin = start / BS;

  // The table entries of this warp's first ring stages, read now (in bounds of the table,
  // whether or not the context reaches them), so they arrive with the context length
  // instead of one memory round trip after it.
  const int* table = p.block_tables + seq * p.stride_bt;
  int first_blocks[C::STAGES];
#pragma unroll
  for (int j = 0; j < C::STAGES; ++j) {
    const int idx = block_begin + warp + j * C::WARPS;
    first_blocks[j] = idx < p.table_width ? table[idx] : 0;
  }
  // decided here, after the table reads are on their way (they are in bounds either way)
  if (skip_empty && start >= end) return;

  // tokens each of this lane's rows sees (rows lane / 4 and lane / 4 + 8 of each M tile),
  // capped by the span end
  auto limit_of = [&](int m) {
    m += row_base;
    const int i = m / gqa;
    if (m >= rows || i >= num_new) return 0;
    const int visible = p.max_qlen > 1 ? context_len - num_new + i + 1 : context_len;
    return min(end, visible);
  };
  int limit[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    limit[mt][0] = limit_of(mt * 16 + lane / 4);
    limit[mt][1] = limit_of(mt * 16 + lane / 4 + 8);
  }

  float qk_scale = p.scale_log2, v_scale = 1.f;
  const bool per_token = KV_KIND != KV_16BIT && p.per_token_scales;
  if constexpr (KV_KIND != KV_16BIT) {
    if (!per_token) {  // both read now, off the critical path of the merge
      qk_scale *= *p.k_scale;
      v_scale = *p.v_scale;
    }
  }

  // ---- phase 1: this warp's blocks through its cp.async ring ----
  const int num_blocks = (end + BS - 1) / BS - block_begin;
  const int mine = warp < num_blocks ? (num_blocks - warp + C::WARPS - 1) / C::WARPS : 0;
  unsigned char* my_ring = ring + warp * C::STAGES * C::STAGE;
  const unsigned char* k_head = static_cast<const unsigned char*>(p.k) + kv_head * p.stride_k_head * C::KV_BYTES;
  const unsigned char* v_head = static_cast<const unsigned char*>(p.v) + kv_head * p.stride_v_head * C::KV_BYTES;
  const i64 scale_head = kv_head * p.stride_scale_head;

  // int8: row c * BS + u of a K tile (dim chunk c, token u) goes to row c * BS + k_ring_row(u):
  // a shift that depends on u % 16 = lane % 16 only (every copy of a lane is 512 bytes on)
  const int k_ring_shift = C::PERMUTED_K ? 16 * (k_ring_row(lane % 16) - lane % 16) : 0;
  auto issue = [&](int j, i64 blk) {  // copy this warp's j-th block, cache block blk, into stage j % STAGES
    unsigned long long policy = l2_stream_policy(p.stream_evict_first != 0);
    if constexpr (ROWS > 16) policy = lane_copy(policy);  // against a ptxas bug (compat_cuda.cuh)
    const unsigned char* kg = k_head + blk * p.stride_k_block * C::KV_BYTES;
    const unsigned char* vg = v_head + blk * p.stride_v_block * C::KV_BYTES;
    unsigned char* ks = my_ring + (j % C::STAGES) * C::STAGE;
#pragma unroll
    for (int off = lane * 16; off < C::KV_TILE; off += 512) {
      cp_async_16(ks + off + k_ring_shift, kg + off, policy);
      cp_async_16(ks + C::KV_TILE + off, vg + off, policy);
    }
    if constexpr (C::SCALES > 0) {
      if (per_token) {  // 4-byte copies: scale rows need not be 16-byte aligned
        float* scales = reinterpret_cast<float*>(ks + 2 * C::KV_TILE);
        const i64 row = blk * p.stride_scale_block + scale_head;
        for (int t = lane; t < 2 * BS; t += 32) cp_async_4(scales + t, (t < BS ? p.k_scale : p.v_scale) + row + t % BS, policy);
      }
    }
  };

  // per M tile: O, and the running max and sum of this lane's two rows (h = 0: lane / 4, 1: + 8)
  float o[MT][HEAD / 8][4], row_max[MT][2], row_sum[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int dt = 0; dt < HEAD / 8; ++dt) o[mt][dt][0] = o[mt][dt][1] = o[mt][dt][2] = o[mt][dt][3] = 0.f;
    row_max[mt][0] = row_max[mt][1] = PA_NEG_INF;
    row_sum[mt][0] = row_sum[mt][1] = 0.f;
  }

  // The query rows of the group go to shared memory in the first copy group, behind the
  // first K/V copies (rows past the group's are zero-filled); loaded one after another, 16
  // rows cost 16 memory round trips. 4-byte copies: Q rows need only be 4-byte aligned. Each
  // thread copies words of one row, so the row's source is worked out once (per word, the
  // division by the run-time gqa made the copy loop a fifth of a small call's instructions).
  // Copy groups: one per ring stage, committed by every thread (empty or not), so stage j
  // is complete once at most STAGES - 1 newer groups are pending.
  constexpr int Q_WORDS = HEAD / 2, Q_ROW_THREADS = C::THREADS / ROWS;
  static_assert(C::THREADS % ROWS == 0 && Q_WORDS % Q_ROW_THREADS == 0, "threads per query row");
  const int q_row = threadIdx.x / Q_ROW_THREADS;  // of the block; of the group:
  const int group_row = row_base + q_row, q_new = group_row / gqa, head = kv_head * gqa + group_row % gqa;
  const bool q_valid = group_row < rows && q_new < num_new;
  const qt* q_src = static_cast<const qt*>(p.q);
  if (q_valid) q_src += (first_row + q_new) * p.stride_q_row + head * p.stride_q_head;
#pragma unroll
  for (int j = 0; j < C::STAGES; ++j) {
    if (j < mine) issue(j, first_blocks[j]);
    if (j == 0) {
#pragma unroll
      for (int k = 0; k < Q_WORDS / Q_ROW_THREADS; ++k) {  // (a zero-filled row reads nothing of Q's first row)
        const int w = threadIdx.x % Q_ROW_THREADS + k * Q_ROW_THREADS, slot = C::PERMUTED_K ? q_word_slot(w) : w;
        cp_async_4_or_zero(q_s + q_row * C::Q_STRIDE + 2 * slot, q_src + 2 * w, q_valid);
      }
    }
    cp_async_commit();
  }

  // fp16 MMAs over a per-token scaled 8-bit cache: weights p * v_scale under 2^-14 would be
  // fp16 subnormals (bits lost for V scales that small), so they are p * v_scale / v_unit,
  // and O counts in v_unit (the merge takes it back). v_unit starts at 2^-126 and moves up to
  // a block's largest V scale whenever that is more than V_UNIT_HEADROOM times it (so first at
  // the warp's first block, unless its scales are all 0): no weight passes 256 (fp16 ends at
  // 65504), whatever the scales. bf16 has the range: no unit. (hip.py builds no balanced
  // kernel for these: at 4 CTAs per SM it has no register for it.)
  constexpr bool V_UNIT = !IS_BF16 && C::SCALES > 0;
  constexpr float V_UNIT_HEADROOM = 256.f;
  float v_unit_inv = per_token ? 0x1p126f : 1.f;

  cp_async_wait<C::STAGES - 1>();  // the first group: this thread's query copies
  __syncthreads();                 // and everyone's, before any warp reads q_s
  for (int j = 0; j < mine; ++j) {
    cp_async_wait<C::STAGES - 1>();
    warp_sync();

    const int token0 = (block_begin + warp + j * C::WARPS) * BS;
    unsigned char* ks = my_ring + (j % C::STAGES) * C::STAGE;
    unsigned char* vs = ks + C::KV_TILE;
    if (token0 + BS > end) {
      // the cache block ends the context: stale V there could be NaN, and 0 * NaN is NaN
      const int valid = end - token0;
      for (int idx = lane; idx < HEAD * (BS - valid); idx += 32) {
        const int t = valid + idx / HEAD, d = idx % HEAD;
        unsigned char* e = vs + ((t / C::X) * HEAD * C::X + d * C::X + t % C::X) * C::KV_BYTES;
        for (int b = 0; b < C::KV_BYTES; ++b) e[b] = 0;
      }
      if constexpr (C::SCALES > 0) {  // and their V scales: P is 0 there, but 0 * NaN is NaN
        float* v_scales = reinterpret_cast<float*>(vs + C::KV_TILE + C::SCALES);
        for (int t = valid + lane; t < BS; t += 32) v_scales[t] = 0.f;
      }
      warp_sync();
    }

    // S = Q K^T for this block's BS tokens, each K fragment into every M tile
    float s[MT][C::NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < C::NT; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
#pragma unroll
    for (int kstep = 0; kstep < HEAD / 16; ++kstep) {
      unsigned a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        ldmatrix_x4(a[mt], q_s + (mt * 16 + lane % 16) * C::Q_STRIDE + kstep * 16 + (lane / 16) * 8);
      if constexpr (KV_KIND == KV_16BIT) {
#pragma unroll
        for (int nt = 0; nt < C::NT; nt += 2) {  // two n-tiles per ldmatrix_x4
          unsigned b[4];
          const int mat = lane / 8, chunk = 2 * kstep + (mat & 1), tok = nt * 8 + (mat >> 1) * 8 + lane % 8;
          ldmatrix_x4(b, ks + (chunk * BS + tok) * 16);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma_16816<IS_BF16>(s[mt][nt], a[mt], b[0], b[1]);
            mma_16816<IS_BF16>(s[mt][nt + 1], a[mt], b[2], b[3]);
          }
        }
      } else {
#pragma unroll
        for (int nt = 0; nt < C::NT; ++nt) {
          const unsigned char* row = ks + (kstep * BS + nt * 8 + lane / 4) * 16;
          unsigned b0, b1;
          widened_pair<C, KV_KIND, IS_BF16>(row, lane, b0, b1);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) mma_16816<IS_BF16>(s[mt][nt], a[mt], b0, b1);
        }
      }
    }
    // the block's token (from token0) of the first of this lane's two columns of n-tile nt
    auto column_token = [&](int nt) {
      return C::PERMUTED_K ? (nt / 2) * 16 + (lane % 4) * 4 + (nt % 2) * 2 : nt * 8 + (lane % 4) * 2;
    };

    // this lane's tokens' per-token scales (1 otherwise): its two columns of each n-tile
    float2 k_tok[C::NT], v_tok[C::NT];
#pragma unroll
    for (int nt = 0; nt < C::NT; ++nt) {
      k_tok[nt] = v_tok[nt] = make_float2(1.f, 1.f);
      if constexpr (C::SCALES > 0) {
        if (per_token) {
          const float* scales = reinterpret_cast<const float*>(vs + C::KV_TILE) + column_token(nt);
          k_tok[nt] = *reinterpret_cast<const float2*>(scales);
          v_tok[nt] = *reinterpret_cast<const float2*>(scales + BS);
        }
      }
    }
    float unit_moved = 1.f;  // O's factor into the new unit (folded into the softmax's alpha)
    if constexpr (V_UNIT) {
      if (per_token) {
        // the block's largest V scale: a quad's lanes hold all its columns, every quad the same
        float largest = 0.f;
#pragma unroll
        for (int nt = 0; nt < C::NT; ++nt) largest = fmaxf(largest, fmaxf(v_tok[nt].x, v_tok[nt].y));
        largest = fmaxf(largest, shfl_xor(largest, 1));
        largest = fmaxf(largest, shfl_xor(largest, 2));
        if (largest * v_unit_inv > V_UNIT_HEADROOM) {  // the same on every lane
          unit_moved = (1.f / largest) / v_unit_inv;
          v_unit_inv = 1.f / largest;
        }
#pragma unroll
        for (int nt = 0; nt < C::NT; ++nt) v_tok[nt] = make_float2(v_tok[nt].x * v_unit_inv, v_tok[nt].y * v_unit_inv);
      }
    }

    // online softmax in base 2 over this block: in M tile mt, accumulators 2h and 2h + 1 of an
    // n-tile are this lane's row h (lane / 4 + 8 h), its two columns
    float block_max[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) block_max[mt][0] = block_max[mt][1] = PA_NEG_INF;
#pragma unroll
    for (int nt = 0; nt < C::NT; ++nt) {
      const int t = token0 + column_token(nt);
      const float f0 = qk_scale * k_tok[nt].x, f1 = qk_scale * k_tok[nt].y;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        float* c = s[mt][nt];
        c[0] = t < limit[mt][0] ? c[0] * f0 : PA_NEG_INF;
        c[1] = t + 1 < limit[mt][0] ? c[1] * f1 : PA_NEG_INF;
        c[2] = t < limit[mt][1] ? c[2] * f0 : PA_NEG_INF;
        c[3] = t + 1 < limit[mt][1] ? c[3] * f1 : PA_NEG_INF;
        block_max[mt][0] = fmaxf(block_max[mt][0], fmaxf(c[0], c[1]));
        block_max[mt][1] = fmaxf(block_max[mt][1], fmaxf(c[2], c[3]));
      }
    }
    float shift[MT][2], o_alpha[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        block_max[mt][h] = fmaxf(block_max[mt][h], shfl_xor(block_max[mt][h], 1));
        block_max[mt][h] = fmaxf(block_max[mt][h], shfl_xor(block_max[mt][h], 2));
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float new_max = fmaxf(row_max[mt][h], block_max[mt][h]);
        // rows that have seen nothing keep -inf: shift by 0 so exp2 gives 0, not NaN
        shift[mt][h] = new_max == PA_NEG_INF ? 0.f : new_max;
        const float alpha = fast_exp2(row_max[mt][h] - shift[mt][h]);
        row_max[mt][h] = new_max;
        row_sum[mt][h] *= alpha;
        o_alpha[mt][h] = alpha * unit_moved;
      }
    }
#pragma unroll
    for (int nt = 0; nt < C::NT; ++nt) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        float* c = s[mt][nt];
        c[0] = fast_exp2(c[0] - shift[mt][0]);
        c[1] = fast_exp2(c[1] - shift[mt][0]);
        c[2] = fast_exp2(c[2] - shift[mt][1]);
        c[3] = fast_exp2(c[3] - shift[mt][1]);
        row_sum[mt][0] += c[0] + c[1];
        row_sum[mt][1] += c[2] + c[3];
      }
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int dt = 0; dt < HEAD / 8; ++dt) {
        o[mt][dt][0] *= o_alpha[mt][0];
        o[mt][dt][1] *= o_alpha[mt][0];
        o[mt][dt][2] *= o_alpha[mt][1];
        o[mt][dt][3] *= o_alpha[mt][1];
      }
    }

    // O += P V, 16 tokens per k-step; S's accumulator fragments are P's A fragments
    // (times V's per-token scales); each V fragment into every M tile
#pragma unroll
    for (int kt = 0; kt < BS / 16; ++kt) {
      const float2 v0 = v_tok[2 * kt], v1 = v_tok[2 * kt + 1];
      unsigned a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        a[mt][0] = as_u32(Q::from_floats(s[mt][2 * kt][0] * v0.x, s[mt][2 * kt][1] * v0.y));
        a[mt][1] = as_u32(Q::from_floats(s[mt][2 * kt][2] * v0.x, s[mt][2 * kt][3] * v0.y));
        a[mt][2] = as_u32(Q::from_floats(s[mt][2 * kt + 1][0] * v1.x, s[mt][2 * kt + 1][1] * v1.y));
        a[mt][3] = as_u32(Q::from_floats(s[mt][2 * kt + 1][2] * v1.x, s[mt][2 * kt + 1][3] * v1.y));
      }
      if constexpr (KV_KIND == KV_16BIT) {
#pragma unroll
        for (int dt = 0; dt < HEAD / 8; dt += 2) {  // two dim tiles per ldmatrix_x4
          unsigned b[4];
          const int mat = lane / 8, group = 2 * kt + (mat & 1), d = (dt + (mat >> 1)) * 8 + lane % 8;
          ldmatrix_x4(b, vs + (group * HEAD + d) * 16);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma_16816<IS_BF16>(o[mt][dt], a[mt], b[0], b[1]);
            mma_16816<IS_BF16>(o[mt][dt + 1], a[mt], b[2], b[3]);
          }
        }
      } else {
#pragma unroll
        for (int dt = 0; dt < HEAD / 8; ++dt) {
          const unsigned char* row = vs + (kt * HEAD + dt * 8 + lane / 4) * 16;
          unsigned b0, b1;
          widened_pair<C, KV_KIND, IS_BF16>(row, lane, b0, b1);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) mma_16816<IS_BF16>(o[mt][dt], a[mt], b0, b1);
        }
      }
    }
    warp_sync();  // every lane is done with this stage before it is refilled
    const int next = j + C::STAGES;
    if (next < mine) issue(next, table[block_begin + warp + next * C::WARPS]);
    cp_async_commit();
  }
  cp_async_wait<0>();

  // Past the cache reads: the split-KV reduce may launch now (it waits for this grid before
  // reading partials). Allowing it at the start made mid-size calls up to 2.7 us slower.
  if (tail().last_span) allow_dependent_launch();

  // ---- phase 2: merge the warps' (max, sum, O) through shared memory ----
  const SpanTail to = tail();
  const int part = to.part;
  const bool write_out = to.write_out;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row_sum[mt][h] += shfl_xor(row_sum[mt][h], 1);
      row_sum[mt][h] += shfl_xor(row_sum[mt][h], 2);
    }
  }
  __syncthreads();  // the ring is free: reuse it
  float* merge_o = reinterpret_cast<float*>(ring);                 // [WARPS][ROWS][MERGE_STRIDE]
  float* merge_max = merge_o + C::WARPS * ROWS * C::MERGE_STRIDE;  // [WARPS][ROWS]
  float* merge_sum = merge_max + C::WARPS * ROWS;
  const int row0 = warp * ROWS + lane / 4;  // this lane's row h of M tile mt: row0 + 16 mt + 8 h
  if (lane % 4 == 0) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        merge_max[row0 + 16 * mt + 8 * h] = row_max[mt][h];
        merge_sum[row0 + 16 * mt + 8 * h] = row_sum[mt][h];
      }
    }
  }
  const float o_unit = V_UNIT ? 1.f / v_unit_inv : 1.f;  // O back from v_unit
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int dt = 0; dt < HEAD / 8; ++dt) {
      const int d = dt * 8 + (lane % 4) * 2;
      float* r0 = merge_o + (row0 + 16 * mt) * C::MERGE_STRIDE + d;
      float* r1 = r0 + 8 * C::MERGE_STRIDE;
      r0[0] = o[mt][dt][0] * o_unit;
      r0[1] = o[mt][dt][1] * o_unit;
      r1[0] = o[mt][dt][2] * o_unit;
      r1[1] = o[mt][dt][3] * o_unit;
    }
  }
  __syncthreads();

  // Each thread merges dims of the query row it copied in: it works out the row's merged max
  // and sum and each warp's weight exp2(max_w - max) / sum (with the V scale) itself, so no
  // thread waits at a barrier while 16 others do it (that wait was 7% of a small call).
  if (!q_valid) return;
  float merged_max = PA_NEG_INF;
#pragma unroll
  for (int w = 0; w < C::WARPS; ++w) merged_max = fmaxf(merged_max, merge_max[w * ROWS + q_row]);
  const float shift = merged_max == PA_NEG_INF ? 0.f : merged_max;
  float weight[C::WARPS], total = 0.f;
#pragma unroll
  for (int w = 0; w < C::WARPS; ++w) {
    weight[w] = fast_exp2(merge_max[w * ROWS + q_row] - shift);
    total += merge_sum[w * ROWS + q_row] * weight[w];
  }
  // total >= 1 for a row that saw a token here; rows that saw none stay 0
  const float norm = v_scale / fmaxf(total, 1e-30f);
  const i64 row = first_row + q_new;
  if (!write_out && threadIdx.x % Q_ROW_THREADS == 0) {
    const i64 e = row * p.stride_es_row + head * p.stride_es_head + part;
    p.exp_sums[e] = total;
    p.max_logits[e] = merged_max * LN2;  // natural-log units, as the partial format says
  }
  const i64 base = write_out ? row * p.stride_out_row + head * p.stride_out_head
                             : row * p.stride_tmp_row + head * p.stride_tmp_head + part * p.stride_tmp_part;
  // two dims per step: float2 reads of the partial O, one 4-byte store of out (its rows are
  // 4-byte aligned); tmp_out (any caller's scratch) is stored one element at a time
#pragma unroll
  for (int k = 0; k < Q_WORDS / Q_ROW_THREADS; ++k) {
    const int d = 2 * (threadIdx.x % Q_ROW_THREADS + k * Q_ROW_THREADS);
    float r0 = 0.f, r1 = 0.f;
#pragma unroll
    for (int w = 0; w < C::WARPS; ++w) {
      const float2 part_o = *reinterpret_cast<const float2*>(merge_o + (w * ROWS + q_row) * C::MERGE_STRIDE + d);
      r0 += part_o.x * weight[w];
      r1 += part_o.y * weight[w];
    }
    r0 *= norm;
    r1 *= norm;
    const i64 at = base + d;
    if (write_out) {
      *reinterpret_cast<typename Q::t2*>(static_cast<qt*>(p.out) + at) = Q::from_floats(r0, r1);
    } else if (p.tmp_kind == 0) {
      static_cast<float*>(p.tmp_out)[at] = r0;
      static_cast<float*>(p.tmp_out)[at + 1] = r1;
    } else if (p.tmp_kind == 1) {
      static_cast<q16<true>::t*>(p.tmp_out)[at] = q16<true>::from_float(r0);
      static_cast<q16<true>::t*>(p.tmp_out)[at + 1] = q16<true>::from_float(r1);
    } else {
      static_cast<q16<false>::t*>(p.tmp_out)[at] = q16<false>::from_float(r0);
      static_cast<q16<false>::t*>(p.tmp_out)[at + 1] = q16<false>::from_float(r1);
    }
  }
}


// The balanced schedule of pa_hybrid/kernels/common.py (balanced_schedule): the pages of
// 256 tokens of all sequences end to end, an equal run of them per CTA of a kv head, cut at
// sequence ends into spans. The loop over a CTA's spans keeps its state in shared memory, in
// the pad of query row 0 (which no span touches): held in registers through decode_span, it
// spilled in variants at the edge of the register file.
struct BalancedState {
  int seq, seq_first_page, seq_end_page;  // the sequence the loop is at, and its pages
  int total_pages;                        // of all sequences
};

// What a CTA derives from the state: its pages [first_page, last_page) and the span's.
struct BalancedSpan {
  int pages_per_program, first_page, last_page, page, end_page;
  __device__ explicit BalancedSpan(const BalancedState& state) {
    pages_per_program = max((state.total_pages + gridDim.x - 1) / gridDim.x, 1);  // gridDim.x CTAs per kv head
    first_page = blockIdx.x * pages_per_program;
    last_page = min(first_page + pages_per_program, state.total_pages);
    page = max(state.seq_first_page, first_page);
    end_page = min(state.seq_end_page, last_page);
  }
  __device__ SpanTail tail(const BalancedState& state) const {
    const int first_program = state.seq_first_page / pages_per_program;
    return {int(blockIdx.x) - first_program, first_program == (state.seq_end_page - 1) / pages_per_program,
            end_page == last_page};
  }
};

// The tokens of a sequence that are attended to: its context length, within [0, max_seq_len]
// (the block table row and the scratch cover no more; a longer context is not checked on the host).
__device__ __forceinline__ int context_of(const SplitKvParams& p, int seq) {
  return min(max(p.context_lens[seq], 0), p.max_seq_len);
}

__device__ __forceinline__ int pages_of(const SplitKvParams& p, int seq) {
  return (context_of(p, seq) + p.partition_size - 1) / p.partition_size;
}

// Finds the sequence of this CTA's first page with a CTA-wide scan of the page counts (in
// the ring, before any span uses it) and writes the loop's first state.
template <int THREADS>
__device__ __forceinline__ void balanced_start(const SplitKvParams& p, int* scan, BalancedState* state) {
  const int per_thread = (p.num_seqs + THREADS - 1) / THREADS;
  const int s_begin = min(threadIdx.x * per_thread, p.num_seqs), s_end = min(s_begin + per_thread, p.num_seqs);
  int mine = 0;
  for (int s = s_begin; s < s_end; ++s) mine += pages_of(p, s);
  scan[threadIdx.x] = mine;
  __syncthreads();
  for (int offset = 1; offset < THREADS; offset *= 2) {  // inclusive scan, Hillis-Steele
    const int add = threadIdx.x >= offset ? scan[threadIdx.x - offset] : 0;
    __syncthreads();
    scan[threadIdx.x] += add;
    __syncthreads();
  }
  const int total = scan[THREADS - 1], thread_first_page = scan[threadIdx.x] - mine;
  const int first_page = blockIdx.x * max((total + gridDim.x - 1) / gridDim.x, 1);
  if (threadIdx.x == 0) {  // and, for a CTA past the last page, a state that ends its loop at once
    state->total_pages = total;
    state->seq_first_page = state->seq_end_page = total;
  }
  __syncthreads();
  if (first_page < total && thread_first_page <= first_page && first_page < thread_first_page + mine) {
    int first = thread_first_page, s = s_begin;  // the sequence holding first_page (never an empty one)
    while (first + pages_of(p, s) <= first_page) first += pages_of(p, s++);
    state->seq = s;
    state->seq_first_page = first;
    state->seq_end_page = first + pages_of(p, s);
  }
  __syncthreads();  // the state is written, and the scan read before a span's copies overwrite it
}

// BALANCED picks the schedule: 0 the static one; n > 0 the balanced one with n CTAs per SM,
// which the launch bounds tell the register allocator (without them, ptxas kept the balanced
// loop under 128 registers by spilling where 255 were free, and above where n = 4 needs it).
// One entry each, so that the static one keeps its registers. The static one of 32 rows
// states 1 CTA per SM (its grids have about that): unbounded, ptxas capped one variant at
// 168 registers (3 CTAs per SM) and spilled.
template <bool IS_BF16, int KV_KIND, int HEAD, int BS, bool WIDE, int ROWS, int BALANCED>
__global__ void __launch_bounds__((SplitKvConfig<IS_BF16, KV_KIND, HEAD, BS, WIDE, ROWS>::THREADS),
                                  (BALANCED > 0 ? BALANCED : ROWS > 16 ? 1 : 0))  // (): HIP's macro splits at commas
    paged_decode_split_kv(const PA_GRID_CONSTANT SplitKvParams p) {
  using C = SplitKvConfig<IS_BF16, KV_KIND, HEAD, BS, WIDE, ROWS>;
  const int kv_head = blockIdx.y / p.row_blocks, row_base = (blockIdx.y % p.row_blocks) * ROWS;
  if constexpr (BALANCED == 0) {
    // partition blockIdx.x of sequence blockIdx.z (decode_span returns at once past the context)
    const int seq = blockIdx.z;
    const int context_len = context_of(p, seq), start = blockIdx.x * p.partition_size;
    const bool whole = p.write_out || context_len <= p.partition_size;  // so partition 0 writes out
    decode_span<IS_BF16, KV_KIND, HEAD, BS, WIDE, ROWS>(p, seq, kv_head, row_base, context_len, start,
                                                  min(start + p.partition_size, context_len), !p.write_out,
                                                  [whole] { return SpanTail{int(blockIdx.x), whole, true}; });
  } else {
    BalancedState* state = reinterpret_cast<BalancedState*>(smem + HEAD * 2);
    balanced_start<C::THREADS>(p, reinterpret_cast<int*>(smem + C::Q_BYTES), state);
    for (;;) {  // one span per sequence
      const BalancedSpan span(*state);
      if (span.page >= span.last_page) break;
      const int seq = state->seq, seq_start = state->seq_first_page * p.partition_size;
      if (span.end_page > span.page) {  // empty sequences have no pages
        const int context_len = context_of(p, seq);
        decode_span<IS_BF16, KV_KIND, HEAD, BS, WIDE, ROWS>(
            p, seq, kv_head, row_base, context_len, span.page * p.partition_size - seq_start,
            min(span.end_page * p.partition_size - seq_start, context_len), false,
            [state] { return BalancedSpan(*state).tail(*state); });
      }
      __syncthreads();  // every thread is done with the state
      if (threadIdx.x == 0) {  // on to the next sequence (past the last, the loop ends: total pages)
        const int next = seq + 1, first = state->seq_end_page;
        state->seq = next;
        state->seq_first_page = first;
        state->seq_end_page = first + (next < p.num_seqs ? pages_of(p, next) : 0);
      }
      __syncthreads();  // the new state is visible, and the next span may reuse shared memory
    }
  }
}

}  // namespace pa
