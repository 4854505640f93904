"""examples/qwen3_decode.py on a tiny Qwen3 through the portable path: the engine loop
(paged cache, per-sequence prefill, batched decode with sequences leaving the batch)
must generate exactly the tokens of transformers' own greedy ``generate``."""

import pytest
import torch

from conftest import DEVICE, load_script

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def example():
    return load_script("examples/qwen3_decode.py")


@pytest.fixture(scope="module")
def model(example):
    return example.build_model("tiny", DEVICE)


PROMPT_LENS = [5, 40, 17]  # ragged, across block edges
NEW_TOKENS = [8, 16, 12]  # sequences leave the batch at different steps


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_tokens_equal_transformers_generate(example, model, backend):
    prompts = example.make_prompts(model.config.vocab_size, PROMPT_LENS, seed=3)
    hf_tokens, hf_logits = example.hf_generate(model, prompts, NEW_TOKENS)
    tokens, logits = example.generate(model, prompts, NEW_TOKENS, torch.bfloat16, backend=backend)
    assert tokens == hf_tokens
    assert [len(t) for t in tokens] == NEW_TOKENS
    assert example.logit_error(logits, hf_logits) < 3e-2  # bf16 rounding of the attention output, propagated


def test_8bit_caches_track_the_bf16_run(example, model):
    prompts = example.make_prompts(model.config.vocab_size, PROMPT_LENS, seed=4)
    tokens, logits = example.generate(model, prompts, NEW_TOKENS, torch.bfloat16, backend="triton")
    for kv_dtype in (torch.float8_e4m3fn, torch.int8):
        _, q_logits = example.generate(model, prompts, NEW_TOKENS, kv_dtype, backend="triton", forced=tokens)
        assert all(torch.isfinite(lo).all() for lo in q_logits)
        top1 = sum(int(a.argmax()) == int(b.argmax()) for ql, bl in zip(q_logits, logits) for a, b in zip(ql, bl))
        assert top1 >= 0.8 * sum(NEW_TOKENS), f"{kv_dtype}: top-1 agreement {top1}/{sum(NEW_TOKENS)}"
        assert example.logit_error(q_logits, logits) < 0.1


def test_blocks_are_scattered_and_returned(example, model):
    cache = example.PagedKVCache(model.config, num_blocks=64, kv_dtype=torch.bfloat16, device=DEVICE, seed=0)
    blocks = cache.reserve(100)
    assert len(blocks) == 7 and blocks != sorted(blocks)  # not one contiguous run
    cache.release(blocks)
    assert sorted(cache.free) == list(range(64))
    with pytest.raises(RuntimeError, match="KV cache full"):
        cache.reserve(65 * 16)


def test_near_tie_report_names_misses_and_their_gaps(example):
    ref = [torch.tensor([[5.0, 4.9, 0.0], [1.0, 9.0, 2.0]])]  # step 0: gap 0.1 / 5; step 1: gap 7 / 9
    ours = [torch.tensor([[4.9, 5.0, 0.0], [1.0, 9.0, 2.0]])]
    assert example.near_tie_report(ours, ref, [[0, 1]]) == [(0, 0, pytest.approx(0.1 / 5.0))]
    assert example.near_tie_report(ref, ref, [[0, 1]]) == []


def test_first_differences_and_the_shared_prefix_logit_error(example):
    assert example.first_differences([[1, 2, 3], [4, 5], [6]], [[1, 9, 3], [4, 5], [7]]) == [1, None, 0]
    ref = [torch.tensor([[4.0, 0.0], [2.0, 0.0], [8.0, 0.0]])]
    ours = [torch.tensor([[4.0, 0.0], [2.0, 1.0], [0.0, 8.0]])]  # parts at step 1: step 2 has other inputs
    assert example.shared_prefix_logit_error(ours, ref, [1]) == pytest.approx(1.0 / 4.0)  # of the largest kept logit
    assert example.shared_prefix_logit_error(ours, ref, [None]) == pytest.approx(8.0 / 8.0)


def test_transformers_eager_attention_is_a_yardstick_and_leaves_the_model_as_it_was(example, model):
    prompts = example.make_prompts(model.config.vocab_size, PROMPT_LENS, seed=5)
    sdpa_tokens, sdpa_logits = example.hf_generate(model, prompts, NEW_TOKENS)
    eager_tokens, eager_logits = example.hf_generate(model, prompts, NEW_TOKENS, attention="eager")
    assert model.config._attn_implementation == "sdpa"
    assert [len(t) for t in eager_tokens] == NEW_TOKENS
    first = example.first_differences(eager_tokens, sdpa_tokens)
    assert example.shared_prefix_logit_error(eager_logits, sdpa_logits, first) < 3e-2
