"""benchmarks/probe_allocator_placement.py: the allocator states it times a case after, in
order, and a case off the grid refused (the timing itself needs a GPU)."""

import json

import pytest

from conftest import REPO_ROOT, load_script
from test_probe_second_call import WORKLOAD  # a one-kv-head grid at test sizes


@pytest.fixture(scope="module")
def probe():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(REPO_ROOT / "benchmarks"))  # it imports probe_second_call from its folder
        return load_script("benchmarks/probe_allocator_placement.py")


def test_states_in_order(probe):
    labels = [label for label, _ in probe.allocator_states([2, 8], pause_s=0.5)]
    assert labels == [
        "fresh",
        "right after 2 GiB written and freed", "again",
        "right after 8 GiB written and freed", "again",
        "0.5 s after 8 GiB freed", "8 GiB freed into torch's cache", "cache released",
    ]  # fmt: skip


def test_a_case_off_the_grid_is_refused(probe, capsys, tmp_path):
    workload = tmp_path / "workload.json"
    workload.write_text(json.dumps(WORKLOAD))
    with pytest.raises(SystemExit):
        probe.main(["--workload", str(workload), "--case", "one-head:3:300:bf16"])
    assert "not one case of the grid" in capsys.readouterr().err
