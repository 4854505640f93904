"""Dropping into an engine: the torch.library custom op, torch.compile(fullgraph=True),
and CUDA-graph capture with caller-provided scratch and out."""

import inspect

import pytest
import torch

from pa_hybrid import dispatch, paged_attention_common, reference_paged_attention
from pa_hybrid.layouts import allocate_scratch
from pa_hybrid.testing import make_decode_case, random_cache_values

from conftest import DEVICE, requires_gpu, skip_if_unsupported, unsupported_reason

BACKENDS = dispatch.available_backends(DEVICE)


def test_op_takes_the_public_arguments():
    public = list(inspect.signature(paged_attention_common).parameters)
    schema = torch.ops.pa_hybrid.paged_attention_common.default._schema
    op = [a.name for a in schema.arguments]
    assert [("out_" if p == "out" else p) for p in op] == public
    mutated = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert mutated == {"exp_sums", "max_logits", "tmp_out", "out"}


def _op_args(case, out, scratch, backend):
    return (
        case["Q"], case["K"], case["V"], *scratch, case["block_tables"], case["context_lens"],
        case["block_tables_stride0"], case["scale"], case["max_qlen"], case["max_seq_len"],
        None, None, case.get("K_QScale_asm"), case.get("V_QScale_asm"), out, case["qo_indptr"],
        1, None, "auto", None, backend, "shapes",
    )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(device, backend):
    case = make_decode_case([300, 20], num_heads=4, num_kv_heads=2, head_size=64, kv_dtype=torch.int8, device=device)
    skip_if_unsupported(backend, case)
    out = torch.empty_like(case["Q"])
    scratch = allocate_scratch(2, 4, 64, case["max_seq_len"], device)
    torch.library.opcheck(
        torch.ops.pa_hybrid.paged_attention_common.default,
        _op_args(case, out, scratch, backend),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(device, backend):
    case = make_decode_case([100, 700, 0], num_heads=8, num_kv_heads=2, device=device)
    skip_if_unsupported(backend, case)
    scratch = allocate_scratch(3, 8, 128, case["max_seq_len"], device)

    def step(q, out):
        # the attention call between two ordinary ops, as in a decoder layer
        paged_attention_common(
            q * 1.0, case["K"], case["V"], *scratch, case["block_tables"], case["context_lens"],
            case["block_tables_stride0"], case["scale"], max_seq_len=case["max_seq_len"], out_=out, backend=backend,
        )  # fmt: skip
        return out * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    out = torch.full_like(case["Q"], float("nan"))
    got = compiled(case["Q"], out)
    ref = reference_paged_attention(**case)
    torch.testing.assert_close(got.float(), 2 * ref, rtol=4e-2, atol=4e-2)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


@requires_gpu
@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
@pytest.mark.parametrize("kv_dtype,qlen", [(torch.bfloat16, 1), (torch.float8_e4m3fn, 1), (torch.bfloat16, 3)])
def test_cuda_graph_replays_with_new_contents(backend, kv_dtype, qlen):
    lens = [700, 1, 300, 0, 257]
    case = make_decode_case(lens, num_heads=16, num_kv_heads=2, head_size=128, kv_dtype=kv_dtype, max_qlen=qlen, device="cuda")
    skip_if_unsupported(backend, case)
    q = case["Q"]
    out = torch.empty_like(q)
    scratch = allocate_scratch(q.shape[0], 16, 128, case["max_seq_len"], "cuda")
    call = dict(case, exp_sums=scratch[0], max_logits=scratch[1], tmp_out=scratch[2], out_=out, backend=backend)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compile) outside the capture
        paged_attention_common(**call)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_attention_common(**call)

    for _ in range(2):  # fresh contents in the captured buffers, then replay
        case["Q"].copy_(torch.randn(q.shape, device="cuda"))
        for name in ("K", "V"):
            case[name].copy_(random_cache_values(case[name].shape, kv_dtype, None, "cuda"))
        for name in ("K_QScale_asm", "V_QScale_asm"):
            if name in case:
                case[name].copy_((0.5 + torch.rand_like(case[name])) / 64)
        case["context_lens"].copy_(torch.randint(0, case["max_seq_len"] + 1, (len(lens),), device="cuda"))
        # any valid block ids (sequences may share blocks, as with prefix caching)
        case["block_tables"].copy_(torch.randint_like(case["block_tables"], 0, case["K"].shape[0]))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = reference_paged_attention(**case)
        rel = ((out.float() - ref).norm() / ref.norm()).item()
        assert rel < (1e-2 if kv_dtype.itemsize == 2 else 3e-2), rel


@requires_gpu
def test_default_call_does_not_synchronize():
    case = make_decode_case([300, 40], num_heads=8, num_kv_heads=2, head_size=128, device="cuda")
    scratch = allocate_scratch(2, 8, 128, case["max_seq_len"], "cuda")
    out = torch.empty_like(case["Q"])
    for backend in BACKENDS + ["auto"]:
        if unsupported_reason(backend, case) is not None:
            continue  # a backend that does not take this call (aiter's on ROCm, say) is not asked
        paged_attention_common(exp_sums=scratch[0], max_logits=scratch[1], tmp_out=scratch[2], out_=out, backend=backend, **case)
        torch.cuda.set_sync_debug_mode("error")
        try:
            paged_attention_common(exp_sums=scratch[0], max_logits=scratch[1], tmp_out=scratch[2], out_=out, backend=backend, **case)
        finally:
            torch.cuda.set_sync_debug_mode("default")
