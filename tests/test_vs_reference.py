"""tools/vs_reference.py without running anything: arguments, the variables each side gets, the reference's log
parser and the side-by-side table (fabricated summaries)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))


@pytest.fixture(scope="module")
def vs():
    spec = importlib.util.spec_from_file_location("vs_reference", TOOLS / "vs_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


REF_LOG = """model_params:2986772
step:1/10000 train_loss:6.9341 train_time:3926ms step_avg:3926.55ms
step:72/10000 train_loss:4.0178 train_time:271002ms step_avg:3764.00ms
step:72/10000 val_loss:3.9000 val_bpb:2.1300 train_time:271002ms step_avg:3764.00ms
DIAGNOSTIC post_ema val_loss:3.8840 val_bpb:2.1223 eval_time:3539ms
final_int6_roundtrip val_loss:3.9017 val_bpb:2.1319 eval_time:3539ms
final_int6_roundtrip_exact val_loss:3.90166519 val_bpb:2.13194383
final_int6_sliding_window_exact val_loss:3.89000000 val_bpb:2.12500000
"""


def test_parse_reference_log(vs):
    s = vs.parse_reference_log(REF_LOG, 1337)
    assert s["steps"] == 72 and s["model_params"] == 2986772 and s["train_seconds"] == 271.002
    assert list(s["stages"]) == ["post_ema", "roundtrip", "sliding"]
    assert s["stages"]["roundtrip"] == {"val_loss": 3.90166519, "val_bpb": 2.13194383, "compliance": "causal"}
    assert s["final_compliant_stage"] == "sliding" and s["config"]["seed"] == 1337


def _summary(steps, bpbs):
    return {"steps": steps, "config": {}, "stages": {k: {"val_bpb": b, "val_loss": b * 1.8, "compliance": "causal"}
                                                     for k, b in zip(("post_ema", "roundtrip", "sliding"), bpbs)}}


def test_table_and_verdicts(vs, tmp_path, capsys):
    for i, sd in enumerate((1, 2, 3)):
        (tmp_path / f"ours_s{sd}.json").write_text(json.dumps(_summary(70 + i, (2.10 + i / 1000, 2.1 + i / 1000,
                                                                                 2.20 + i / 1000))))
        (tmp_path / f"ref_s{sd}.json").write_text(json.dumps(_summary(71, (2.10 + i / 1000, 2.2 + i / 1000,
                                                                            2.10 + i / 1000))))
    lines = vs.table(vs.load_runs(tmp_path))
    assert sum(l.startswith("| 1 |") for l in lines) == 2  # one row per side and seed
    rows = {l.split("|")[1].strip(): l for l in lines if l.startswith("| ") and "|" in l[2:]}
    assert rows["post_ema"].rstrip(" |").endswith("not worse")
    assert rows["roundtrip"].rstrip(" |").endswith("better")
    assert rows["sliding"].rstrip(" |").endswith("WORSE")
    pen = rows["roundtrip - post_ema"]  # ours lose 0 to quantization, the reference 0.1 on every seed
    assert pen.rstrip(" |").endswith("better") and "-0.1000" in pen and "-0.18000" in pen
    assert "+0.1000" in rows["sliding"] and rows["steps"].startswith("| steps | 71.0 (1.0) | 71.0 (0.0) | +0.0 |")
    assert vs.main(["--out", str(tmp_path), "--table"]) == 0
    assert "roundtrip" in capsys.readouterr().out


def test_cli_input_errors(vs, tmp_path, capsys):
    assert vs.main(["--out", str(tmp_path), "--table"]) == 2  # nothing finished yet
    assert "no finished runs" in capsys.readouterr().err
    assert vs.main(["--out", str(tmp_path), "--seeds", "x"]) == 2
    assert vs.main(["--out", str(tmp_path), "--anchors", str(tmp_path)]) == 2  # no cpu_patch.py there
    assert "cpu_patch.py" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        vs.main(["--seeds", "1"])  # --out is required
    assert e.value.code == 2


def test_dry_run_gives_both_sides_the_same_settings(vs, tmp_path, capsys):
    anchors = tmp_path / "anchors"
    anchors.mkdir()
    (anchors / "cpu_patch.py").write_text("")
    (anchors / "pr549_train_gpt.py").write_text(
        "\n".join(f'    x = os.environ.get("{k}", 1)' for k in ("NUM_LAYERS", "MODEL_DIM", "VE_DIM", "SEED", "DATA_PATH",
                                                                 "CONTROL_TENSOR_NAME_PATTERNS", "MTP_NUM_HEADS")))
    assert vs.main(["--out", str(tmp_path), "--anchors", str(anchors), "--seeds", "5,6", "--dry-run",
                    "--env", "MODEL_DIM=128", "--env", "NUM_HEADS=2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4
    ours, ref = dict(kv.split("=", 1) for kv in out[0].split()[3:]), dict(kv.split("=", 1) for kv in out[1].split()[3:])
    assert ours["MODEL_DIM"] == ref["MODEL_DIM"] == "128" and ours["SEED"] == ref["SEED"] == "5"
    assert ours["TTT_ENABLED"] == ref["TTT_ENABLED"] == "0" and ours["SLOT_ENABLED"] == "0"
    assert ref["NUM_LAYERS"] == "4" and ref["VE_DIM"] == "128"  # the cpu preset's values
    assert "CONTROL_TENSOR_NAME_PATTERNS" not in ref and "MTP_NUM_HEADS" not in ref  # its own default; not ours
    assert Path(ref["DATA_PATH"]).is_absolute()
    assert vs.main(["--out", str(tmp_path), "--anchors", str(anchors), "--env", "NUM_HEADS"]) == 2
    assert vs.main(["--out", str(tmp_path), "--anchors", str(anchors), "--env", "GPTQ=1", "--dry-run"]) == 2
