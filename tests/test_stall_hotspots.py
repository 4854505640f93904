"""benchmarks/stall_hotspots.py on a source-page CSV laid out as Nsight Compute writes it."""

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
