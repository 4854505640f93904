"""benchmarks/model_program_waves.py: the model's two limits (programs' rate, DRAM's) and the
static grid's programs."""

import json

import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def model():
    return load_script("benchmarks/model_program_waves.py")


def test_rate_bound_programs_run_in_whole_waves(model):
    # 2 waves of 4 programs, each 100 bytes at 10 bytes/us after 1 us: 2 x 11 us; DRAM far away
    assert model.stage1_us([100] * 8, slots=4, rate=10.0, bandwidth=1e9, start_us=1.0) == pytest.approx(22.0)
    # one program more starts a third wave
    assert model.stage1_us([100] * 9, slots=4, rate=10.0, bandwidth=1e9, start_us=1.0) == pytest.approx(33.0)


def test_dram_bound_programs_share_the_bandwidth(model):
    # 4 programs at once could read 400 bytes/us, DRAM gives 40: 800 bytes take 20 us after the start
    assert model.stage1_us([200] * 4, slots=4, rate=100.0, bandwidth=40.0, start_us=0.5) == pytest.approx(20.5)


def test_static_partitions_in_launch_order(model):
    assert model.partition_bytes([5, 2], partition=4, bytes_per_token=10, kv_heads=2) == [40, 10, 40, 10, 20, 20]


def test_the_command_line_prints_a_row_per_partition(model, capsys, tmp_path):
    workload = tmp_path / "workload.json"
    workload.write_text(json.dumps({
        "head_size": 128, "models": {"one-kv-head": {"num_heads": 16, "num_kv_heads": 1}},
        "mixed_lengths": {"num_seqs": 32, "min_len": 64, "max_len": 4096, "seed": 0},
    }))  # fmt: skip
    model.main(["--workload", str(workload), "--model", "one-kv-head", "--slots", "8", "--partitions", "1024", "2048"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("one-kv-head, 32 x mixed")
    assert [line.split()[0] for line in out[2:]] == ["1024", "2048"]
