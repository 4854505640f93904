"""Measured dispatch tables: building from timings, JSON, finding the table of a GPU,
lookup, and the dispatcher's decisions under a synthetic table. CPU only: the
device name and capability are stand-ins."""

import json

import pytest
import torch

from pa_hybrid import dispatch, dispatch_table
from pa_hybrid.bench.decode import DEFAULT_WORKLOAD, DecodeCase, enumerate_cases, load_workload
from pa_hybrid.call import build_call
from pa_hybrid.dispatch_table import DispatchTable, build_table, format_table, kv_class
from pa_hybrid.tune import Measurement, format_regrets, pick, policy_regrets, shape_models

from test_dispatch import all_four, key

GPU, CC = "Test GPU 80GB", (9, 0)
BF16, FP8, INT8 = torch.bfloat16, torch.float8_e4m3fn, torch.int8


def gqa_key(pairs, ctx, *, gqa=4, num_kv_heads=8, kv_dtype=BF16, **changes):
    """A key with ``pairs`` (sequence, kv head) pairs and ``max_seq_len=ctx``."""
    assert pairs % num_kv_heads == 0
    scales = "per_token" if kv_dtype in (FP8, INT8) else "none"
    return key(gqa=gqa, num_kv_heads=num_kv_heads, concurrency=pairs // num_kv_heads, max_seq_len=ctx,
               kv_dtype=kv_dtype, scales=scales, **changes)  # fmt: skip


# synthetic timings, gqa 4 bf16: split-KV ("hip") wins few pairs with long contexts, asm the rest
SYNTHETIC = [
    (gqa_key(8, 512), {"hip": 15.0, "asm": 12.0, "triton": 18.0}),
    (gqa_key(8, 8192), {"hip": 30.0, "asm": 77.0, "triton": 34.0}),
    (gqa_key(128, 512), {"hip": 29.0, "asm": 23.0, "triton": 32.0}),
    (gqa_key(128, 8192), {"hip": 205.0, "asm": 193.0, "triton": 255.0}),
    (gqa_key(16, 8192, gqa=16, num_kv_heads=1), {"hip": 61.0, "asm": 74.0, "triton": 51.0}),
    (gqa_key(8, 8192, kv_dtype=FP8), {"asm": 91.0, "triton": 29.0}),
]


def synthetic_table(**changes):
    return build_table(SYNTHETIC, changes.get("gpu", GPU), changes.get("cc", CC), {"date": "test"})


def test_build_groups_points_and_ranks_backends():
    table = synthetic_table()
    assert [(g.kv, g.rows, g.head_size) for g in table.groups] == [("16bit", 4, 128), ("16bit", 16, 128), ("fp8", 4, 128)]
    bf16 = table.groups[0]
    assert [(p.pairs, p.ctx, p.order[0]) for p in bf16.points] == [(8, 512, "asm"), (8, 8192, "hip"), (128, 512, "asm"), (128, 8192, "asm")]
    assert bf16.points[1].order == ("hip", "triton", "asm") and bf16.points[1].us == (30.0, 34.0, 77.0)
    assert table.groups[2].points[0].order == ("triton", "asm")


def test_cases_on_one_point_are_merged_by_relative_time():
    # two models share gqa 16, pairs 4 and ctx 2048: asm is 10% behind in one, 30% ahead in the other
    a = gqa_key(4, 2048, gqa=16, num_kv_heads=1)
    b = gqa_key(4, 2048, gqa=16, num_kv_heads=4)
    table = build_table([(a, {"asm": 11.0, "triton": 10.0}), (b, {"asm": 10.0, "triton": 13.0, "hip": 12.0})], GPU, CC)
    (point,) = table.groups[0].points
    assert point.cases == 2 and point.order == ("asm", "triton", "hip")  # hip ran on one case only: last
    assert point.us[0] == round((11.0 * 10.0) ** 0.5, 2)


@pytest.mark.parametrize(
    "pairs,ctx,expected",
    [
        (8, 512, (8, 512)),
        (1, 100, (8, 512)),  # below every point: the nearest
        (8, 2048, (8, 8192)),  # log-midpoint of 512 and 8192: the tie goes to the larger
        (8, 2047, (8, 512)),
        (32, 8192, (128, 8192)),  # 32: the log-midpoint of 8 and 128
        (31, 8192, (8, 8192)),
        (10**6, 10**6, (128, 8192)),
    ],
)
def test_lookup_takes_the_nearest_row_then_the_nearest_context(pairs, ctx, expected):
    point = synthetic_table().groups[0].nearest(pairs, ctx)
    assert (point.pairs, point.ctx) == expected


def test_group_choice_rounds_query_rows_up_and_is_silent_elsewhere():
    table = synthetic_table()
    assert table.group_for(gqa_key(8, 512, gqa=1)).rows == 4
    assert table.group_for(gqa_key(8, 512, gqa=8)).rows == 16  # the next measured group up
    assert table.group_for(gqa_key(8, 512, gqa=2, max_qlen=3)).rows == 16  # rows: GQA x max_qlen
    assert table.group_for(gqa_key(8, 512, gqa=32)) is None  # above every measured group
    assert table.group_for(gqa_key(8, 512, max_qlen=8)) is None
    assert table.group_for(gqa_key(8, 512, head_size=64)) is None
    assert table.group_for(gqa_key(8, 512, kv_dtype=INT8)) is None  # no int8 group measured
    assert table.group_for(gqa_key(8, 512, kv_dtype=torch.float16)).kv == "16bit"
    assert kv_class(torch.float8_e4m3fnuz) == "fp8"


def test_json_round_trip_and_malformed_tables(tmp_path):
    table = synthetic_table()
    path = table.save(tmp_path / "t.json")
    loaded = DispatchTable.load(path)
    assert loaded.groups == table.groups and loaded.source == str(path) and loaded.matches(GPU, CC)
    assert loaded.measured == {"date": "test"}
    data = json.loads(path.read_text())
    for breakage, message in [
        (lambda d: d.update(format=99), "format 99"),
        (lambda d: d["groups"][0].pop("rows"), "missing or malformed field"),
        (lambda d: d.pop("groups"), "missing or malformed field"),
        (lambda d: d["groups"][0].update(kv="fp4"), "kv 'fp4'"),
        (lambda d: d["groups"][0]["points"][0].update(us=[1.0]), "one time per backend"),
        (lambda d: d["groups"][0].update(points=[]), "points need"),
    ]:
        broken = json.loads(json.dumps(data))
        breakage(broken)
        with pytest.raises(ValueError, match=message):
            DispatchTable.from_json(broken, "broken.json")
    # format 1 keyed its groups by GQA, tuned on decode calls (rows = GQA)
    old = json.loads(json.dumps(data))
    old["format"] = 1
    for g in old["groups"]:
        g["gqa"] = g.pop("rows")
    assert DispatchTable.from_json(old).groups == table.groups


def test_table_search_order_user_then_environment_then_shipped(tmp_path, monkeypatch):
    monkeypatch.setattr(dispatch_table, "TABLE_DIR", tmp_path / "shipped")
    synthetic_table().save(tmp_path / "shipped" / "test-gpu.json")
    monkeypatch.delenv(dispatch_table.TABLE_ENV, raising=False)
    assert dispatch_table.table_for(GPU, CC).source.endswith("test-gpu.json")
    assert dispatch_table.table_for(GPU, (8, 0)) is None  # same name, other capability
    assert dispatch_table.table_for("Other GPU", CC) is None

    env_table = synthetic_table().save(tmp_path / "env" / "mine.json")
    monkeypatch.setenv(dispatch_table.TABLE_ENV, str(env_table))
    assert dispatch_table.table_for(GPU, CC).source == str(env_table)
    monkeypatch.setenv(dispatch_table.TABLE_ENV, str(env_table.parent))  # a directory works too
    assert dispatch_table.table_for(GPU, CC).source == str(env_table)
    user = synthetic_table()
    assert dispatch_table.table_for(GPU, CC, [user]) is user
    monkeypatch.setenv(dispatch_table.TABLE_ENV, str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="PA_HYBRID_DISPATCH_TABLE: no file"):
        dispatch_table.table_for(GPU, CC)


@pytest.fixture
def table_policy(monkeypatch):
    """The dispatcher on a stand-in GPU with the synthetic table (set through the API)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: GPU)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: CC)
    monkeypatch.delenv(dispatch_table.TABLE_ENV, raising=False)
    monkeypatch.setattr(dispatch, "_REGISTRY", {b.name: b for b in all_four()})
    dispatch.set_table(synthetic_table())
    yield
    dispatch.set_table(None)
    dispatch.unavailable_reason.cache_clear()


# (key, backend changes, expected backend, skipped)
TABLE_DECISIONS = [
    (gqa_key(8, 512), {}, "asm", []),  # the rule would say hip (8 pairs < 64); the table measured asm
    (gqa_key(8, 8192), {}, "hip", []),
    (gqa_key(128, 8192), {}, "asm", []),
    (gqa_key(8, 8192), {"hip": {"unavailable": "no NVRTC"}}, "triton", ["hip"]),  # the row's runner-up
    (gqa_key(8, 8192, kv_dtype=FP8), {}, "triton", []),
    (gqa_key(8, 8192, kv_dtype=FP8), {"triton": {"head_sizes": (64,)}}, "asm", ["triton"]),
    (gqa_key(8, 8192, kv_dtype=FP8), {"triton": {"head_sizes": (64,)}, "asm": {"max_gqa": 2}}, "hip", ["triton", "asm"]),  # unmeasured: rule order
    (gqa_key(1024, 512, kv_dtype=INT8), {}, "asm", []),  # no int8 group: the rule (1024 pairs >= 128)
    (gqa_key(8, 512, gqa=2, max_qlen=2), {}, "asm", []),  # 4 rows: the rows-4 group's point
    (gqa_key(8, 512, max_qlen=8), {}, "hip", []),  # 32 rows, past every group: the rule (8 pairs < 64)
    (gqa_key(8, 512, max_qlen=9), {}, "hip", []),  # 36 rows: the rule (8 pairs < 16)
    (gqa_key(128, 8192, max_qlen=9), {}, "triton", []),  # 36 rows: the rule (128 pairs >= 16)
]


@pytest.mark.parametrize("call_key,backend_changes,expected,skipped", TABLE_DECISIONS)
def test_decisions_under_a_table(table_policy, monkeypatch, call_key, backend_changes, expected, skipped):
    monkeypatch.setattr(dispatch, "_REGISTRY", {b.name: b for b in all_four(**backend_changes)})
    dispatch.select.cache_clear()
    dispatch.unavailable_reason.cache_clear()
    sel = dispatch.select(call_key)
    assert sel.backend == expected and list(sel.skipped) == skipped


def test_explain_names_the_table_row(table_policy):
    sel = dispatch.select(gqa_key(8, 600))
    assert sel.backend == "asm" and sel.rule == f"measured on {GPU}: asm fastest"
    assert (sel.table_row.point.pairs, sel.table_row.point.ctx) == (8, 512)
    text = str(sel)
    assert "decided by table <memory> (measured test): kv=16bit rows<=4 head_size=128, nearest point pairs=8 ctx=512" in text
    assert "asm 12.0 us, hip 15.0 us, triton 18.0 us" in text
    uncovered = dispatch.select(gqa_key(1024, 512, kv_dtype=INT8))
    assert uncovered.table_row is None and "pairs >= 128" in uncovered.rule
    assert dispatch.select(gqa_key(8, 600, kernel_name="pa_x")).rule == "kernelName names an asm kernel"


def test_a_table_says_when_it_was_measured():
    """explain() shows the table's date and commit: a table measured before the kernels last
    changed may rank them wrong, and the user can see that and re-tune."""
    assert synthetic_table().when_measured() == " (measured test)"
    both = build_table(SYNTHETIC, GPU, CC, {"date": "2026-12-05", "git_commit": "1b26b45", "torch": "2.11"})
    assert both.when_measured() == " (measured 2026-12-05 at 1b26b45)"
    assert build_table(SYNTHETIC, GPU, CC, {"git_commit": "1b26b45"}).when_measured() == " (measured at 1b26b45)"
    assert build_table(SYNTHETIC, GPU, CC).when_measured() == ""


def test_the_table_is_found_once_per_device(table_policy, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: calls.append(index) or GPU)
    dispatch.set_table(synthetic_table())  # clears the per-device cache
    for ctx in (100, 200, 300):
        dispatch.select(gqa_key(8, ctx))
    dispatch.select(gqa_key(8, 100, device_index=1))
    assert calls == [0, 1]


def test_format_table_shows_winners_and_leads():
    text = format_table(synthetic_table())
    assert "dispatch table for Test GPU 80GB (sm_90)" in text
    lines = text.splitlines()
    row8 = lines[lines.index("kv=16bit rows<=4 head_size=128") + 2]
    assert row8.split() == ["8", "asm", "1.25", "hip", "1.13"]


# ---- the tune command's logic, on synthetic measurements ------------------------------------


def test_policy_regrets_table_leave_one_out_and_rule():
    measurements = [Measurement(f"case{i}", k, t) for i, (k, t) in enumerate(SYNTHETIC)]
    table = synthetic_table()
    rows = policy_regrets(measurements, table, dispatch.DispatchRules())
    assert all(regret == 1.0 for (_, regret), _, _ in rows)  # the table reproduces its own cases
    # 8 pairs x 512 without its own point: the nearest left is 8 x 8192 (hip): 15 / 12
    assert rows[0][1] == ("hip", pytest.approx(15.0 / 12.0))
    assert rows[0][2] == ("hip", pytest.approx(15.0 / 12.0))  # the rule: 8 pairs < 64, split-KV
    fp8 = rows[5]
    assert fp8[2] == ("triton", 1.0)  # the rule skips hip: no time means it refused the call
    text = format_regrets(measurements, rows)
    assert "case0: fastest asm 12.0 us; table asm 1.00  leave-one-out hip 1.25  fallback rule hip 1.25" in text
    assert "table: within 3%: 6/6, within 10%: 6/6; geomean 1.000, worst 1.00" in text


def test_pick_skips_backends_that_did_not_run():
    assert pick(("hip", "asm", "triton"), {"asm": 2.0, "triton": 1.0}) == "asm"


def test_shapes_option():
    assert shape_models(["64:8", "16:1"]) == {
        "h64kv8": {"num_heads": 64, "num_kv_heads": 8},
        "h16kv1": {"num_heads": 16, "num_kv_heads": 1},
    }
    for bad in ("64x8", "64:0", "10:4"):
        with pytest.raises(ValueError, match="--shapes"):
            shape_models([bad])


def test_decode_case_key_is_the_key_of_the_built_call():
    spec = DecodeCase(
        model="m", kv="int8", num_seqs=3, ctx="mixed", context_lens=(17, 40, 5), num_heads=8, num_kv_heads=2,
        head_size=64, block_size=16, q_dtype=BF16, kv_dtype=INT8,
    )  # fmt: skip
    call = build_call(**spec.build("cpu"), exp_sums=None, max_logits=None, tmp_out=None)
    assert spec.call_key("cpu") == call.key


def test_tune_needs_a_gpu(capsys, monkeypatch):
    from pa_hybrid import tune

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tune.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


# ---- the shipped tables -----------------------------------------------------------------------


SHIPPED = sorted(dispatch_table.TABLE_DIR.glob("*.json"))


def test_tables_are_shipped():
    assert SHIPPED, f"no dispatch table in {dispatch_table.TABLE_DIR}"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_table_is_well_formed(path):
    table = DispatchTable.load(path)
    assert table.gpu and len(table.compute_capability) == 2 and table.measured.get("git_commit")
    for group in table.groups:
        for point in group.points:
            assert set(point.order) <= set(dispatch.BACKEND_NAMES)
            if point.cases == 1:  # one case: ranked by its times
                assert list(point.us) == sorted(point.us)
            assert group.nearest(point.pairs, point.ctx) is point  # every measured point decides its own cell


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_table_covers_the_benchmark_grid(path):
    if not DEFAULT_WORKLOAD.is_file():
        pytest.skip(f"the shared workload is not at {DEFAULT_WORKLOAD}")
    table = DispatchTable.load(path)
    for case in enumerate_cases(load_workload()):
        row = table.lookup(case.call_key("cuda"))
        assert row is not None, f"{case.label} falls outside {path.name}"
        # every grid case was measured: its own point decides
        assert (row.point.pairs, row.point.ctx) == (case.num_seqs * case.num_kv_heads, max(case.context_lens)), case.label


def test_tune_options():
    from pa_hybrid.tune import parse_args

    args = parse_args(["--shapes", "64:8,32:4", "--num-seqs", "1,16", "--kv-dtypes", "bf16", "fp8", "--quick"])
    assert args.shapes == ["64:8", "32:4"] and args.num_seqs == [1, 16] and args.kv_dtypes == ["bf16", "fp8"]
    assert args.quick and args.models is None and args.samples == 30


def test_merge_tables_adds_the_groups_a_run_did_not_measure():
    base = synthetic_table()
    large = build_table(
        [
            (gqa_key(8, 512, max_qlen=8), {"hip": 20.0, "asm": 30.0}),  # 32 rows: a new group
            (gqa_key(8, 512, gqa=16), {"triton": 9.0, "hip": 10.0}),  # 16 rows: replaces base's group
        ],
        GPU, CC, measured={"date": "later"},
    )  # fmt: skip
    merged = dispatch_table.merge_tables(base, large)
    assert [(g.kv, g.rows) for g in merged.groups] == [("16bit", 4), ("16bit", 16), ("16bit", 32), ("fp8", 4)]
    assert merged.group_for(gqa_key(8, 512, gqa=16)).points[0].order[0] == "triton"
    assert merged.group_for(gqa_key(8, 512)) == base.group_for(gqa_key(8, 512))
    assert merged.measured == {"date": "later", "earlier": [{"date": "test"}]}
    again = dispatch_table.merge_tables(merged, build_table([(gqa_key(8, 512), {"asm": 1.0})], GPU, CC, {"date": "last"}))
    assert again.measured["earlier"] == [{"date": "later"}, {"date": "test"}]
    with pytest.raises(ValueError, match="tables of one GPU model only"):
        dispatch_table.merge_tables(base, build_table([(gqa_key(8, 512), {"asm": 1.0})], "Other GPU", CC))
    from pa_hybrid.tune import parse_args

    assert parse_args(["--add-to", "t.json"]).add_to == "t.json"
