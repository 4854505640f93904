"""benchmarks/stall_hotspots.py on a source-page CSV laid out as Nsight Compute writes it."""

import gzip

import pytest

from conftest import load_script


CSV = """==PROF== Connected to process 1234
"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)","Instructions Executed"
"00007f0000000010","LDSM.16.M88.4 R12, [R117]","1,200","1,000","4096"
"00007f0000000020","F2FP.F16.E4M3.UNPACK_B R92, R12","300","250","8192"
"00007f0000000030","@!P3 BRA `(.L_x_8)","100","90","512"
"00007f0000000040","LDSM.16.M88.4 R88, [R102]","400","380","4096"
"00007f0000000050","HMMA.16816.F32.BF16 R96, R88, R96, RZ","0","0","4096"
"""


CSV_WITH_REASONS = """"Kernel Name","pa_decode",
"Address","Source","Warp Stall Sampling (All Samples)","L1 Wavefronts Shared Excessive","L1 Wavefronts Shared","stall_long_sb","stall_wait","stall_long_sb (Not Issued)"
"10","LDGSTS.E.BYPASS.128 desc[UR16][R14.64], !P2, [R91]","10","6,000","8,000","0","10","0"
"20","STS.128 [R204+UR5], R88","70","0","4,000","60","10","55"
"30","@P0 STS.128 [R204+UR5+0x100], R92","20","500","1,000","20","0","20"
"""


@pytest.fixture(scope="module")
def script():
    return load_script("benchmarks/stall_hotspots.py")


def test_samples_per_instruction_and_per_opcode(script, tmp_path):
    path = tmp_path / "sass.csv"
    path.write_text(CSV)
    total, per_instruction, per_opcode = script.hotspots(str(path))
    assert total == 2000
    assert per_instruction[0] == (1200, "LDSM.16.M88.4 R12, [R117]")
    assert per_opcode == {"LDSM": 1600, "F2FP": 300, "BRA": 100, "HMMA": 0}  # predicates are not opcodes


def test_main_prints_shares_and_refuses_a_file_without_the_table(script, tmp_path, capsys):
    path = tmp_path / "sass.csv"
    path.write_text(CSV)
    assert script.main([str(path), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "80.0%  LDSM" in out and "60.0%  LDSM.16.M88.4 R12, [R117]" in out
    other = tmp_path / "details.csv"
    other.write_text('"ID","Metric Name","Metric Value"\n"0","Duration","12"\n')
    with pytest.raises(ValueError, match="no header"):
        script.hotspots(str(other))


def test_stall_reasons_per_opcode_and_shared_memory_excess(script, tmp_path, capsys):
    path = tmp_path / "sass.csv"
    path.write_text(CSV_WITH_REASONS)
    reasons = script.stall_reasons(str(path))
    assert reasons == {"long_sb": {"LDGSTS": 0, "STS": 80}, "wait": {"LDGSTS": 10, "STS": 10}}  # not the Not-Issued copy
    assert script.shared_excess(str(path)) == [
        (6000, 8000, "LDGSTS.E.BYPASS.128 desc[UR16][R14.64], !P2, [R91]"),
        (500, 1000, "@P0 STS.128 [R204+UR5+0x100], R92"),
    ]
    assert script.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "80.0%  long_sb          STS 100%" in out and "20.0%  wait             LDGSTS 50%, STS 50%" in out
    assert "excess shared-memory wavefronts: 6500" in out


def test_older_csv_has_no_reasons_or_excess(script, tmp_path):
    path = tmp_path / "sass.csv"
    path.write_text(CSV)
    assert script.stall_reasons(str(path)) == {} and script.shared_excess(str(path)) == []


def test_regions_sum_runs_of_instructions_in_program_order(script, tmp_path, capsys):
    path = tmp_path / "sass.csv"
    path.write_text(CSV_WITH_REASONS)
    found = script.regions(str(path), 2)
    assert [(start, samples, first) for start, samples, _, _, first in found] == [
        (0, 80, "LDGSTS.E.BYPASS.128 desc[UR16][R14.64], !P2, [R91]"),
        (2, 20, "@P0 STS.128 [R204+UR5+0x100], R92"),
    ]
    assert found[0][3] == {"long_sb": 60, "wait": 20}  # not the Not-Issued copy
    assert found[0][2] == 0  # no "Instructions Executed" column
    path = tmp_path / "sass.csv.gz"
    with gzip.open(path, "wt") as f:  # as benchmarks/data keeps them
        f.write(CSV)
    assert [most for _, _, most, _, _ in script.regions(str(path), 3)] == [8192, 4096]
    assert script.main([str(path), "--top", "1", "--regions", "3"]) == 0
    assert "x8192" in capsys.readouterr().out
    with pytest.raises(ValueError, match="at least 1"):
        script.regions(str(path), 0)
