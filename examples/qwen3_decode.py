"""A Qwen3 decode loop on pa_hybrid, checked against Hugging Face transformers.

The integration guide in code: a Qwen3-architecture model built by ``transformers``
from a config (random weights, fixed seed, nothing downloaded) generates greedily
from a batch of prompts with its own paged KV cache, the way an engine runs it:

* blocks are handed out from a shuffled free list (non-contiguous), reserved per
  sequence at admission for its prompt and its token budget, released when it ends;
* prefill runs per sequence through the model's own attention (SDPA) while the
  attention hook writes each layer's K/V into the shuffled cache
  (``reshape_and_cache``; ``reshape_and_cache_with_pertoken_quant`` for fp8/int8);
* every decode step writes the new token's K/V the same way and attends with
  ``paged_attention_common`` over the cache; sequences of different lengths finish at
  different times and leave the batch;
* optionally the decode step (model, attention, argmax and the cache bookkeeping) is
  captured once in a CUDA graph and replayed.

The hook is a ``transformers`` attention function (``AttentionInterface``), so the
model's own projections, norms, RoPE and MLP run unchanged.

Accuracy is judged beside a yardstick: ``transformers``' own eager attention against its
SDPA. A random-weight model's logits are flat, so two correct bf16 attentions pick
different tokens at near ties and greedy decoding then parts; the teacher-forced check
shows whether each miss is such a tie.

    python examples/qwen3_decode.py                      # GPU: accuracy, then tokens/s per backend
    python examples/qwen3_decode.py --config tiny --device cpu --skip-throughput   # the portable path

Without a GPU the Triton kernels need ``TRITON_INTERPRET=1`` (set here when no GPU is found).
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before pa_hybrid defines its Triton kernels

import pa_hybrid  # noqa: E402
from pa_hybrid.layouts import allocate_scratch, is_8bit, k_cache_shape, scale_shape, v_cache_shape  # noqa: E402

ATTENTION_NAME = "pa_hybrid"

CONFIGS = {
    # a dense Qwen3 small enough for one GPU with long contexts at batch 256 (GQA 2, as Qwen3-8B's 32/8 is 4)
    "dense": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, vocab_size=32768),
    # the attention shape of Qwen3-235B-A22B (64 query heads, 4 kv heads, head size 128), a small dense MLP
    "moe-attention": dict(hidden_size=2048, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=64,
                          num_key_value_heads=4, head_dim=128, vocab_size=32768),
    # the CPU test's model
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, vocab_size=512),
}  # fmt: skip

BLOCK_SIZE = 16
KV_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "int8": torch.int8}


class Float32Head(torch.nn.Module):
    """The LM head in float32, as engines sample from float32 logits: a random model's
    logits are flat, and in bf16 (8 bits of mantissa) its top two tie often enough that
    any last-bit difference upstream picks another token."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.detach().float(), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden.float(), self.weight)


def build_model(config_name: str, device, seed: int = 0):
    """A Qwen3 causal LM with random weights (seeded), bf16 but for a float32 LM head, in
    eval mode, SDPA attention."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**CONFIGS[config_name], max_position_embeddings=65536, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval()
    model.lm_head = Float32Head(model.lm_head.weight)
    model.config._attn_implementation = "sdpa"
    model.generation_config.eos_token_id = None  # generate exactly the asked number of tokens
    model.generation_config.pad_token_id = 0
    return model


# --------------------------------------------------------------------------- #
# The engine side: a paged cache and the attention hook
# --------------------------------------------------------------------------- #


class PagedKVCache:
    """Per-layer K/V in pa_hybrid's shuffled layout, per-token scales for 8-bit caches,
    and a free list of blocks in random order (so sequences get scattered blocks)."""

    def __init__(self, config, num_blocks: int, kv_dtype: torch.dtype, device, seed: int = 0):
        kvh, hd = config.num_key_value_heads, config.head_dim
        self.kv_dtype = kv_dtype
        self.K = [torch.empty(k_cache_shape(num_blocks, kvh, hd, BLOCK_SIZE, kv_dtype), dtype=kv_dtype, device=device)
                  for _ in range(config.num_hidden_layers)]  # fmt: skip
        self.V = [torch.empty(v_cache_shape(num_blocks, kvh, hd, BLOCK_SIZE, kv_dtype), dtype=kv_dtype, device=device)
                  for _ in range(config.num_hidden_layers)]  # fmt: skip
        quantized = is_8bit(kv_dtype)
        shape = scale_shape(num_blocks, kvh, BLOCK_SIZE)
        self.k_scales = [torch.empty(shape, device=device) for _ in self.K] if quantized else None
        self.v_scales = [torch.empty(shape, device=device) for _ in self.V] if quantized else None
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()

    def reserve(self, num_tokens: int) -> list:
        blocks = -(-num_tokens // BLOCK_SIZE)
        if blocks > len(self.free):
            raise RuntimeError(f"KV cache full: {blocks} blocks wanted, {len(self.free)} free")
        taken, self.free = self.free[:blocks], self.free[blocks:]
        return taken

    def release(self, blocks: list) -> None:
        self.free += blocks

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store ``key``/``value`` ``[tokens, kv_heads, head_size]`` at ``slot_mapping``."""
        if self.k_scales is None:
            pa_hybrid.reshape_and_cache(key, value, self.K[layer], self.V[layer], slot_mapping)
        else:
            pa_hybrid.reshape_and_cache_with_pertoken_quant(
                key, value, self.K[layer], self.V[layer], self.k_scales[layer], self.v_scales[layer], slot_mapping
            )


@dataclass
class StepState:
    """What the attention hook needs for one forward pass (tensors stay put under CUDA graphs)."""

    cache: PagedKVCache
    slot_mapping: torch.Tensor  # [tokens] int64: where each new token's K/V go
    prefill: bool
    block_tables: torch.Tensor | None = None  # [batch, max_blocks] int32 (decode)
    context_lens: torch.Tensor | None = None  # [batch] int32, the new token included (decode)
    max_seq_len: int = 1  # host-side bound of context_lens: sizes the scratch, feeds the dispatcher
    scratch: tuple = (None, None, None)  # exp_sums, max_logits, tmp_out (None: allocated per call)
    backend: str = "auto"


def paged_attention_hook(module, query, key, value, attention_mask, scaling, dropout=0.0, pa_step=None, **kwargs):
    """The ``transformers`` attention function: cache the new K/V, then attend.

    ``query`` ``[batch, heads, tokens, head_size]``, ``key``/``value`` ``[batch, kv_heads,
    tokens, head_size]`` (after the model's norms and RoPE). Prefill (one sequence) runs
    the model's SDPA; decode (one token per sequence) runs ``paged_attention_common``
    on a strided view of Q."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    step: StepState = pa_step
    layer = module.layer_idx
    step.cache.write(layer, key.transpose(1, 2).flatten(0, 1), value.transpose(1, 2).flatten(0, 1), step.slot_mapping)
    if step.prefill:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    cache = step.cache
    out = pa_hybrid.paged_attention_common(
        query[:, :, 0, :], cache.K[layer], cache.V[layer], *step.scratch,
        step.block_tables, step.context_lens, step.block_tables.stride(0), scaling,
        max_seq_len=step.max_seq_len,
        K_QScale_asm=None if cache.k_scales is None else cache.k_scales[layer],
        V_QScale_asm=None if cache.v_scales is None else cache.v_scales[layer],
        backend=step.backend,
    )  # fmt: skip
    return out.unsqueeze(1), None  # [batch, 1, heads, head_size]


def register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, paged_attention_hook)


@contextmanager
def attention_implementation(model, name: str):
    """The model's attention is ``transformers``' ``name`` ("sdpa", "eager", or a
    registered function) inside the block."""
    previous = model.config._attn_implementation
    model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = previous


def paged_attention(model):
    """The model's attention goes through :func:`paged_attention_hook` inside the block."""
    register_attention()
    return attention_implementation(model, ATTENTION_NAME)


def forward(model, input_ids, position_ids, step: StepState) -> torch.Tensor:
    """Logits of the last position of each row, float32. The mask is handed over as
    "already built" (None: causal prefill in SDPA, nothing to mask in decode)."""
    out = model(input_ids=input_ids, position_ids=position_ids, attention_mask={"full_attention": None},
                use_cache=False, pa_step=step, logits_to_keep=1)  # fmt: skip
    return out.logits[:, -1].float()


def slots_for(blocks: list, positions: range) -> list:
    return [blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in positions]


# --------------------------------------------------------------------------- #
# Greedy generation, eager (accuracy) and CUDA-graph replay (throughput)
# --------------------------------------------------------------------------- #


@torch.inference_mode()
def generate(model, prompts: list, new_tokens: list, kv_dtype, backend="auto", forced=None, seed=0):
    """Greedy generation of ``new_tokens[i]`` tokens after ``prompts[i]``, eager.

    Returns (tokens per sequence, logits per sequence ``[new_tokens[i], vocab]``).
    With ``forced`` (token lists), step ``t`` feeds ``forced[i][t]`` instead of the
    argmax: the logits of two caches can then be compared step by step."""
    device = model.device
    cfg = model.config
    total = sum(len(p) + n for p, n in zip(prompts, new_tokens))
    cache = PagedKVCache(cfg, num_blocks=total // BLOCK_SIZE + 2 * len(prompts) + 8, kv_dtype=kv_dtype, device=device, seed=seed)
    blocks = [cache.reserve(len(p) + n) for p, n in zip(prompts, new_tokens)]
    tokens, logits = [[] for _ in prompts], [[] for _ in prompts]
    with paged_attention(model):
        for i, prompt in enumerate(prompts):  # prefill, one sequence at a time
            slots = torch.tensor(slots_for(blocks[i], range(len(prompt))), device=device)
            step = StepState(cache, slots, prefill=True)
            ids = torch.tensor([prompt], device=device)
            last = forward(model, ids, torch.arange(len(prompt), device=device)[None], step)[0]
            logits[i].append(last)
            tokens[i].append(int(last.argmax()) if forced is None else forced[i][0])
        while True:
            active = [i for i in range(len(prompts)) if len(tokens[i]) < new_tokens[i]]
            finished = [i for i in range(len(prompts)) if len(tokens[i]) == new_tokens[i] and blocks[i]]
            for i in finished:  # leaves the batch, its blocks go back to the pool
                cache.release(blocks[i])
                blocks[i] = []
            if not active:
                break
            positions = [len(prompts[i]) + len(tokens[i]) - 1 for i in active]  # of the token fed now
            width = max(len(blocks[i]) for i in active)
            table = torch.tensor([blocks[i] + [0] * (width - len(blocks[i])) for i in active], dtype=torch.int32)
            step = StepState(
                cache,
                slot_mapping=torch.tensor([slots_for(blocks[i], [p])[0] for i, p in zip(active, positions)], device=device),
                prefill=False,
                block_tables=table.to(device),
                context_lens=torch.tensor([p + 1 for p in positions], dtype=torch.int32, device=device),
                max_seq_len=max(positions) + 1,
                backend=backend,
            )
            ids = torch.tensor([[tokens[i][-1]] for i in active], device=device)
            step_logits = forward(model, ids, torch.tensor(positions, device=device)[:, None], step)
            for row, i in enumerate(active):
                logits[i].append(step_logits[row])
                t = len(tokens[i])
                tokens[i].append(int(step_logits[row].argmax()) if forced is None else forced[i][t])
    return tokens, [torch.stack(rows) for rows in logits]


@torch.inference_mode()
def hf_generate(model, prompts: list, new_tokens: list, attention: str = "sdpa"):
    """``transformers``' own greedy ``generate`` (its own cache, its ``attention``
    implementation: "sdpa" or "eager"), one prompt at a time (no padding): tokens and
    per-step logits."""
    tokens, logits = [], []
    with attention_implementation(model, attention):
        for prompt, n in zip(prompts, new_tokens):
            out = model.generate(torch.tensor([prompt], device=model.device), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True)  # fmt: skip
            tokens.append(out.sequences[0, len(prompt):].tolist())
            logits.append(torch.stack([step[0].float() for step in out.logits]))
    return tokens, logits


@torch.inference_mode()
def decode_throughput(model, batch: int, prompt_len: int, steps: int, backend: str, kv_dtype=torch.bfloat16,
                      cuda_graph: bool = True) -> float:  # fmt: skip
    """Output tokens per second of ``steps`` greedy decode steps of ``batch`` sequences
    after ``prompt_len``-token prompts. The cache is filled by one batched prefill
    (throughput does not need per-sequence SDPA); each decode step (model, attention,
    argmax, advancing lengths and slots) is one CUDA-graph replay."""
    device = model.device
    cfg = model.config
    max_len = prompt_len + steps + 1
    per_seq = -(-max_len // BLOCK_SIZE)
    cache = PagedKVCache(cfg, num_blocks=batch * per_seq, kv_dtype=kv_dtype, device=device)
    table = torch.tensor([cache.reserve(max_len) for _ in range(batch)], dtype=torch.int32, device=device)
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (batch, 1), generator=g).to(device)
    positions = torch.full((batch, 1), prompt_len, device=device)
    lens = torch.full((batch,), prompt_len + 1, dtype=torch.int32, device=device)
    rows = torch.arange(batch, device=device)

    def slots():
        p = positions[:, 0]
        return table[rows, p // BLOCK_SIZE].long() * BLOCK_SIZE + p % BLOCK_SIZE

    # the prompts' K/V: random, written straight into the cache (what prefill would leave there)
    for layer in range(cfg.num_hidden_layers):
        kv = torch.randn(2, batch * prompt_len, cfg.num_key_value_heads, cfg.head_dim, device=device, dtype=torch.bfloat16)
        prompt_slots = (table[:, :, None].long() * BLOCK_SIZE + torch.arange(BLOCK_SIZE, device=device)).flatten(1)[:, :prompt_len]
        cache.write(layer, kv[0], kv[1], prompt_slots.flatten())
    scratch = allocate_scratch(batch, cfg.num_attention_heads, cfg.head_dim, max_len, device)
    slot_mapping = slots()
    step = StepState(cache, slot_mapping, prefill=False, block_tables=table, context_lens=lens,
                     max_seq_len=max_len, scratch=scratch, backend=backend)  # fmt: skip

    def decode_step():
        logits = forward(model, ids, positions, step)
        ids.copy_(logits.argmax(-1, keepdim=True))
        positions.add_(1)
        lens.add_(1)
        slot_mapping.copy_(slots())

    with paged_attention(model):
        decode_step()  # warm up: compiles kernels, fills caches
        run = decode_step
        if cuda_graph:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                decode_step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                decode_step()
            run = graph.replay
        torch.cuda.synchronize()
        steps_left = steps - (3 if cuda_graph else 1)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps_left):
            run()
        end.record()
        torch.cuda.synchronize()
    return batch * steps_left / (start.elapsed_time(end) * 1e-3)


# --------------------------------------------------------------------------- #
# The checks and the report
# --------------------------------------------------------------------------- #


def make_prompts(vocab: int, lengths: list, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def logit_error(ours: list, reference: list) -> float:
    """Largest |difference| of per-step logits, relative to the largest |reference logit|."""
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(ours, reference))


def first_differences(tokens: list, reference: list) -> list:
    """Per sequence, the first step whose token differs from ``reference`` (None: equal)."""
    return [next((t for t, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(tokens, reference)]


def shared_prefix_logit_error(ours: list, reference: list, first_diffs: list) -> float:
    """:func:`logit_error` over the steps two free-running generations share inputs for:
    up to and including each sequence's first differing token."""
    return logit_error([a[: len(a) if d is None else d + 1] for a, d in zip(ours, first_diffs)],
                       [b[: len(b) if d is None else d + 1] for b, d in zip(reference, first_diffs)])  # fmt: skip


def near_tie_report(ours: list, reference: list, tokens: list) -> tuple:
    """Teacher-forced comparison (both runs fed ``tokens``): the steps where our argmax is
    not ``tokens``' next token, and the reference's own top-2 gap at each, over its max logit."""
    misses = []
    for seq, (a, b, t) in enumerate(zip(ours, reference, tokens)):
        for step in range(len(t)):
            if int(a[step].argmax()) != t[step]:
                top2 = b[step].topk(2).values
                misses.append((seq, step, float((top2[0] - top2[1]) / b[step].abs().max())))
    return misses


def check_accuracy(model, prompts, new_tokens, backend="auto", emit=print) -> bool:
    """bf16 cache: tokens against transformers' generate, free-running (beside
    transformers' eager attention against its SDPA: how far two correct bf16 attentions
    part on this model) and teacher-forced (every miss must be a near tie: a top-2 gap
    within twice the largest logit difference);
    fp8/int8: top-1 agreement and logit error against the bf16 run, teacher-forced on its tokens."""
    hf_tokens, hf_logits = hf_generate(model, prompts, new_tokens)

    def agreement(tokens, logits) -> str:
        first_diff = first_differences(tokens, hf_tokens)
        same = first_diff.count(None)
        return (f"{same}/{len(prompts)} sequences equal ({sum(new_tokens)} tokens, free-running)"
                + ("" if same == len(prompts) else f", first differences at steps {first_diff}")
                + f", max logit difference {shared_prefix_logit_error(logits, hf_logits, first_diff):.2e} "
                "up to the first difference")  # fmt: skip

    # the yardstick: transformers' own eager attention against its SDPA, same weights and prompts
    emit(f"transformers' generate, eager attention vs SDPA: {agreement(*hf_generate(model, prompts, new_tokens, 'eager'))}")
    tokens, logits = generate(model, prompts, new_tokens, torch.bfloat16, backend)
    emit(f"bf16 cache, backend={backend}, vs transformers' generate (SDPA): {agreement(tokens, logits)}")
    forced_tokens, forced_logits = generate(model, prompts, new_tokens, torch.bfloat16, backend, forced=hf_tokens)
    error = logit_error(forced_logits, hf_logits)
    misses = near_tie_report(forced_logits, hf_logits, hf_tokens)
    ties = all(gap <= 2 * error for _, _, gap in misses)
    emit(f"  teacher-forced on transformers' tokens: max logit difference {error:.2e} (relative to the max logit); "
         f"argmax differs at {len(misses)}/{sum(new_tokens)} steps"
         + (f", top-2 gaps there {', '.join(f'{g:.1e}' for _, _, g in misses)}: "
            + ("all near ties" if ties else "NOT all near ties") if misses else ""))  # fmt: skip
    for name in ("fp8", "int8"):
        q_tokens, q_logits = generate(model, prompts, new_tokens, KV_DTYPES[name], backend, forced=tokens)
        top1 = sum(int(a.argmax()) == int(b.argmax()) for ql, bl in zip(q_logits, logits) for a, b in zip(ql, bl))
        emit(f"{name} cache, backend={backend}: top-1 agreement with the bf16 run {top1}/{sum(new_tokens)} "
             f"({100 * top1 / sum(new_tokens):.1f}%), max logit error {logit_error(q_logits, logits):.2e}")  # fmt: skip
    return ties


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="dense")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompt-lens", type=int, nargs="+", default=[37, 200, 515, 1000, 129, 64, 333, 16])
    p.add_argument("--new-tokens", type=int, default=64, help="tokens of the first sequence; each next one 8 more")
    p.add_argument("--backend", default="auto", help="backend of the accuracy run")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 128, 256])
    p.add_argument("--throughput-prompt-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--skip-throughput", action="store_true")
    args = p.parse_args(argv)

    model = build_model(args.config, args.device)
    cfg = model.config
    print(f"Qwen3 '{args.config}': {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} query / "
          f"{cfg.num_key_value_heads} kv heads, head size {cfg.head_dim}, on {args.device}")  # fmt: skip
    prompts = make_prompts(cfg.vocab_size, args.prompt_lens)
    new_tokens = [args.new_tokens + 8 * i for i in range(len(prompts))]  # sequences finish at different times
    ok = check_accuracy(model, prompts, new_tokens, args.backend)
    if args.skip_throughput or args.device == "cpu":
        return 0 if ok else 1

    backends = ["auto"] + [b for b in ("hip", "asm", "triton", "torch") if b in pa_hybrid.dispatch.available_backends(args.device)]
    print(f"\noutput tokens/s, {args.steps} decode steps after {args.throughput_prompt_len}-token prompts, "
          "CUDA-graph replay, bf16 cache ('torch' = gather + SDPA, the plain-torch baseline):")  # fmt: skip
    print(f"{'batch':>6} " + "".join(f"{b:>10}" for b in backends) + "   auto / best")
    for batch in args.batches:
        rates = {}
        for backend in backends:
            try:
                rates[backend] = decode_throughput(model, batch, args.throughput_prompt_len, args.steps, backend)
            except (ValueError, RuntimeError) as e:
                print(f"  {backend} at batch {batch}: {type(e).__name__}: {str(e).splitlines()[0]}")
            torch.cuda.empty_cache()
        best = max(v for b, v in rates.items() if b != "auto")
        print(f"{batch:>6} " + "".join(f"{rates.get(b, float('nan')):>10.0f}" for b in backends)
              + f"   {rates.get('auto', float('nan')) / best:.3f}")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
