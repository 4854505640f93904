"""benchmarks/bench_against_base.py: installing a tree's kernels (the base's or this one's)
replaces every cache that holds what the other tree installed."""

from conftest import load_script

from pa_hybrid.backends import asm
from pa_hybrid.runtime import compiler, env


def test_installing_a_tree_rereads_its_asm_kernel_table(tmp_path, monkeypatch):
    """A base whose manifest has a kernel fewer: after its install asm reads that table, and
    after the tree's install the tree's again (asm caches the table and its choices per call)."""
    script = load_script("benchmarks/bench_against_base.py")
    tree_asm_dir = env.asm_dir
    base_asm = tmp_path / "asm"
    base_asm.mkdir()
    lines = (tree_asm_dir() / "manifest.csv").read_text().splitlines()
    (base_asm / "manifest.csv").write_text("\n".join(lines[:-1]) + "\n")
    tree = (
        compiler.csrc_dir, tree_asm_dir, script.triton_backend.launch_paged_decode,
        script.hip_backend.launch_split_kv_reduce, script.hip_backend.kernel_entry,
    )  # fmt: skip
    for module, name in ((compiler, "csrc_dir"), (env, "asm_dir"), (script.triton_backend, "launch_paged_decode"),
                         (script.triton_backend, "launch_split_kv_reduce"), (script.hip_backend, "launch_split_kv_reduce"),
                         (script.hip_backend, "kernel_entry")):
        monkeypatch.setattr(module, name, getattr(module, name))  # put back after the test
    try:
        assert len(asm.manifest()) == len(lines) - 1  # the tree's table, cached
        script._install(tree[0], lambda: base_asm, *tree[2:])
        assert len(asm.manifest()) == len(lines) - 2
        script._install(*tree)
        assert len(asm.manifest()) == len(lines) - 1
    finally:
        asm.manifest.cache_clear()
        asm.kernel_for.cache_clear()


def test_a_base_without_the_rows_argument_gets_its_kernel_names():
    import pytest
    import torch

    script = load_script("benchmarks/bench_against_base.py")
    variant = (torch.bfloat16, torch.float8_e4m3fn, 128, 16, False)
    assert script.hip_backend.kernel_entry(*variant, 16, 4) == "pa::paged_decode_split_kv<true, 1, 128, 16, false, 16, 4>"
    assert script._entry_without_rows(*variant, 16, 4) == "pa::paged_decode_split_kv<true, 1, 128, 16, false, 4>"
    with pytest.raises(ValueError, match="16 query rows only, not 32"):
        script._entry_without_rows(*variant, 32, 0)
