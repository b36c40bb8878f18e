"""Config.from_env parsing, presets, validation and retired/unknown names; the seed's run command; and the
no-side-effects-at-import rule (checked in a fresh interpreter)."""
import dataclasses
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SEED_FILES = sorted(Path("/work/shared/seeds").glob("004_*.txt")) if Path("/work/shared/seeds").is_dir() else []


def cfg_of(tg, **env):
    return tg.Config.from_env({"PRESET": "competition", **{k: str(v) for k, v in env.items()}})


def user_error(tg, env: dict, preset="competition") -> str:
    with pytest.raises(tg.UserError) as ei:
        tg.Config.from_env({"PRESET": preset, **env})
    return str(ei.value)


# ---- parsing ----
@pytest.mark.parametrize("raw, want", [("1", True), ("0", False), ("true", True), ("False", False), ("on", True),
                                       ("off", False), (" 1 ", True), ("", False), ("yes", True), ("no", False)])
def test_bool_parsing(tg, raw, want):
    assert cfg_of(tg, SLOT_ENABLED=raw).slot_enabled is want
    assert cfg_of(tg, TTT_ENABLED=raw).ttt_enabled is want


@pytest.mark.parametrize("raw, want", [("7", 7), (" 12 ", 12), ("1e3", 1000), ("8.0", 8), ("0", 0)])
def test_int_parsing(tg, raw, want):
    assert cfg_of(tg, ITERATIONS=raw).iterations == want
    assert type(cfg_of(tg, ITERATIONS=raw).iterations) is int


@pytest.mark.parametrize("raw, want", [("0.5", 0.5), ("1e-3", 1e-3), ("3", 3.0), (" .25", 0.25)])
def test_float_parsing(tg, raw, want):
    c = cfg_of(tg, TTT_LR=raw)
    assert c.ttt_lr == want and type(c.ttt_lr) is float


@pytest.mark.parametrize("raw, want", [("9,10", (9, 10)), ("3", (3,)), (" 1 , 2 ,", (1, 2)), ("", ())])
def test_tuple_parsing(tg, raw, want):
    assert cfg_of(tg, VE_LAYERS=raw).ve_layers == want


def test_string_fields(tg):
    c = cfg_of(tg, DATA_PATH="/x/y", SLOT_MODE="causal", DEVICE="cpu", RUN_ID="abc")
    assert (c.data_path, c.slot_mode, c.device, c.run_id) == ("/x/y", "causal", "cpu", "abc")


@pytest.mark.parametrize("name, raw", [("SLOT_ENABLED", "2"), ("SLOT_ENABLED", "maybe"), ("ITERATIONS", "8.5"),
                                       ("ITERATIONS", "ten"), ("ITERATIONS", "inf"), ("TTT_LR", "fast"),
                                       ("TTT_LR", "nan"), ("TTT_LR", "inf"), ("VE_LAYERS", "9,ten"),
                                       ("VE_LAYERS", "9.5")])
def test_malformed_values_name_the_variable(tg, name, raw):
    msg = user_error(tg, {name: raw})
    assert msg.startswith(f"{name}={raw!r}") and "malformed" in msg, msg


@pytest.mark.parametrize("env, name", [
    ({"NUM_LAYERS": "0"}, "NUM_LAYERS"), ({"ITERATIONS": "-1"}, "ITERATIONS"), ({"MATRIX_LR": "-0.1"}, "MATRIX_LR"),
    ({"MUON_MOMENTUM": "1"}, "MUON_MOMENTUM"), ({"EMA_DECAY": "1.5"}, "EMA_DECAY"), ({"CTW_WEIGHT": "1"}, "CTW_WEIGHT"),
    ({"SLOT_MODE": "window"}, "SLOT_MODE"), ({"DEVICE": "tpu"}, "DEVICE"), ({"MODEL_DIM": "500"}, "MODEL_DIM"),
    ({"NUM_KV_HEADS": "3"}, "NUM_KV_HEADS"), ({"ROPE_DIMS": "15"}, "ROPE_DIMS"), ({"ROPE_DIMS": "80"}, "ROPE_DIMS"),
    ({"XSA_LAST_N": "12"}, "XSA_LAST_N"), ({"VE_LAYERS": "9,11"}, "VE_LAYERS"), ({"BIGRAM_VOCAB_SIZE": "1"},
                                                                               "BIGRAM_VOCAB_SIZE"),
    ({"VOCAB_SIZE": "70000"}, "VOCAB_SIZE"), ({"EVAL_STRIDE": "4096"}, "EVAL_STRIDE"),
    ({"EVAL_STRIDE": "96"}, "EVAL_SEQ_LEN"), ({"TTT_CHUNK_TOKENS": "1000"}, "TTT_CHUNK_TOKENS"),
    ({"TRAIN_BATCH_TOKENS": "1000"}, "TRAIN_BATCH_TOKENS"), ({"EVAL_ONLY": "1"}, "LOAD_ARTIFACT"),
    ({"SLOT_EPS": "0"}, "SLOT_EPS"), ({"TTT_FREEZE_BLOCKS": "12"}, "TTT_FREEZE_BLOCKS"),
])
def test_out_of_range_values_name_the_variable(tg, env, name):
    msg = user_error(tg, env)
    assert msg.startswith(f"{name}=") and "out of range" in msg, msg


def test_bad_preset(tg):
    assert "PRESET='gpu'" in user_error(tg, {}, preset="gpu")


# ---- presets ----
def test_default_preset_follows_the_device(tg):
    assert tg.Config.from_env({}, cuda=True) == tg.Config()
    assert tg.Config.from_env({}, cuda=False).preset == "cpu"
    assert tg.Config.from_env({"PRESET": "competition"}, cuda=False).preset == "competition"


def test_competition_preset_is_the_field_defaults(tg):
    c = tg.Config.from_env({"PRESET": "competition"})
    assert c == tg.Config()
    assert c.diff_from_defaults() == {}


def test_cpu_preset_values_and_explicit_override(tg):
    c = tg.Config.from_env({"PRESET": "cpu"})
    for k, v in tg.PRESET_VALUES["cpu"].items():
        assert getattr(c, k) == v, k
    assert c.preset == "cpu"
    c2 = tg.Config.from_env({"PRESET": "cpu", "MODEL_DIM": "128", "WARMDOWN_ITERS": "7", "COMPILE": "1"})
    assert (c2.model_dim, c2.warmdown_iters, c2.compile) == (128, 7, True)
    assert c2.num_layers == tg.PRESET_VALUES["cpu"]["num_layers"]  # untouched preset values stay


def test_diff_from_defaults_is_a_run_command_that_rebuilds_the_config(tg):
    for env in ({"PRESET": "cpu"}, {"PRESET": "cpu", "VE_LAYERS": "1,3", "SLOT_MODE": "causal", "TTT_LR": "0.0125"}):
        c = tg.Config.from_env(env)
        cmd = c.diff_from_defaults()
        assert "PRESET" not in cmd and "RUN_ID" not in cmd
        again = tg.Config.from_env({"PRESET": "competition", **cmd})
        assert dataclasses.replace(again, preset=c.preset) == c


def test_import_by_path_without_sys_modules():
    """Loading the file by path (as a hook or a frozen record copy is loaded) works without registering it first."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("tg_by_path", Path(__file__).resolve().parent.parent / "train_gpt.py")
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    assert m.Config.from_env({"PRESET": "cpu"}).model_dim == 256


def test_every_field_has_a_parseable_type_and_formats_back(tg):
    c = tg.Config.from_env({"PRESET": "cpu"})
    for f in dataclasses.fields(tg.Config):
        assert f.name == f.name.lower() and f.name.isidentifier()
        typ = f.type
        assert typ in (int, float, bool, str, tuple), f.name
        v = getattr(c, f.name)
        assert tg._parse_value(f.name.upper(), tg._format_value(v), typ) == v, f.name


# ---- retired and unknown names ----
def test_retired_names(tg):
    msg = user_error(tg, {"DTG_ENABLED": "1"})
    assert msg.startswith("DTG_ENABLED='1'") and "not supported" in msg
    for name in ("LAWA_ENABLED", "GATED_ATTENTION", "VALUE_RESIDUAL", "MTP_NUM_HEADS"):
        assert name in user_error(tg, {name: "1"})
        cfg_of(tg, **{name: "0"})  # the off value is accepted
    c = cfg_of(tg, DTG_ENABLED="0", SWA_ENABLED="1", SWA_EVERY="50", MUON_BETA2="0.95")
    assert c == tg.Config()
    notes = tg.env_warnings({"SWA_ENABLED": "1", "SWA_EVERY": "50"})
    assert any(n.startswith("config:ignored SWA_ENABLED=1") for n in notes)
    assert all("WARNING" not in n for n in notes)


def test_env_warnings_suggest_the_close_name(tg):
    notes = tg.env_warnings({"SLOT_ENABLE": "1"})
    assert len(notes) == 1 and "SLOT_ENABLE=1" in notes[0] and "did you mean SLOT_ENABLED?" in notes[0]
    notes = tg.env_warnings({"TTT_LEARNING_RATE": "0.1"})  # our prefix, no close name: still flagged
    assert len(notes) == 1 and notes[0].startswith("WARNING: unknown variable TTT_LEARNING_RATE")
    quiet = {"SLOT_ENABLED": "1", "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_PORT": "1",
             "PATH": "/bin", "HOME": "/root", "OMP_NUM_THREADS": "1", "DEBUG": "1", "PRESET": "cpu"}
    assert tg.env_warnings(quiet) == []


# ---- the seed's SLOT run command ----
def seed_slot_command_env() -> dict:
    txt = SEED_FILES[0].read_text(encoding="utf-8")
    cmds = re.findall(r"cd /workspace/parameter-golf && (.*?)torchrun", txt, re.S)
    assert len(cmds) == 2, "expected the baseline and the SLOT run commands"
    env = dict(re.findall(r"\b([A-Z][A-Z0-9_]*)=(\S+)", cmds[1]))
    assert env["SLOT_ENABLED"] == "1" and len(env) >= 30
    return env


@pytest.mark.skipif(not SEED_FILES, reason="/work/shared/seeds/004_*.txt is absent")
def test_seed_slot_command_is_the_competition_default(tg):
    env = seed_slot_command_env()
    cfg = tg.Config.from_env({"PRESET": "competition", **env})
    base = tg.Config()
    known = {f.name.upper() for f in dataclasses.fields(tg.Config)}
    checked = 0
    for name, raw in env.items():
        if name in known:
            assert getattr(cfg, name.lower()) == getattr(base, name.lower()), name
            checked += 1
        else:
            assert name in tg.RETIRED_VARS, f"{name} is neither a Config field nor a retired name"
    assert checked >= 30
    assert cfg == base  # the defaults reproduce the seed's SLOT command exactly
    notes = tg.env_warnings(env)
    assert notes and all(n.startswith("config:ignored SWA_") for n in notes), notes


# ---- main() reports a user error in one line ----
def test_main_user_error_is_one_line_exit_2(tg, capsys):
    old = signal.getsignal(signal.SIGTERM)
    try:
        rc = tg.main({"PRESET": "cpu", "NUM_LAYERS": "x"})
    finally:
        signal.signal(signal.SIGTERM, old)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip().splitlines() == ["error: NUM_LAYERS='x' is malformed: expected an integer"]


def test_device_cuda_without_cuda_is_a_user_error(tg):
    import torch
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    cfg = tg.Config.from_env({"PRESET": "cpu", "DEVICE": "cuda"})
    with pytest.raises(tg.UserError, match="DEVICE=cuda"):
        tg.setup_runtime(cfg, {})
    rt = tg.setup_runtime(tg.Config.from_env({"PRESET": "cpu", "AMP": "0"}), {})
    assert (rt.device.type, rt.world_size, rt.rank, rt.amp, rt.compile, rt.distributed) == ("cpu", 1, 0, False, False,
                                                                                             False)


# ---- importing is free ----
IMPORT_PROBE = r"""
import json, os, signal, sys, threading
import numpy, torch, torch.distributed, torch.nn, torch.nn.functional  # train_gpt's own imports, loaded first
import copy, dataclasses, difflib, glob, io, lzma, math, time, uuid, zlib, concurrent.futures
for opt in ("zstandard", "brotli", "flash_attn_interface", "flash_attn", "sentencepiece", "tqdm"):
    try:
        __import__(opt)
    except ImportError:
        pass
reads = []
class Spy(dict):
    def __getitem__(self, k): reads.append(k); return dict.__getitem__(self, k)
    def get(self, k, d=None): reads.append(k); return dict.get(self, k, d)
    def __contains__(self, k): reads.append(k); return dict.__contains__(self, k)
    def __iter__(self): reads.append("<iter>"); return dict.__iter__(self)
    def keys(self): reads.append("<keys>"); return dict.keys(self)
    def items(self): reads.append("<items>"); return dict.items(self)
real = os.environ
sigterm = signal.getsignal(signal.SIGTERM)
threads = threading.active_count()
os.environ = Spy(real)
import train_gpt
os.environ = real
print(json.dumps({"reads": reads, "dist": torch.distributed.is_initialized(),
                  "cuda_init": torch.cuda.is_initialized(), "sigterm_same": signal.getsignal(signal.SIGTERM) is sigterm,
                  "threads": threading.active_count() - threads, "file": train_gpt.__file__}))
"""


def test_import_has_no_side_effects(tmp_path):
    mod, cwd = tmp_path / "mod", tmp_path / "cwd"
    mod.mkdir()
    cwd.mkdir()
    shutil.copy(REPO_ROOT / "train_gpt.py", mod / "train_gpt.py")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(mod), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "HOME": str(tmp_path / "home")}
    p = subprocess.run([sys.executable, "-B", "-c", IMPORT_PROBE], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1, f"import printed something: {p.stdout!r}"
    r = json.loads(lines[0])
    assert r["file"] == str(mod / "train_gpt.py")
    assert r["reads"] == [], "env read at import"
    assert r["dist"] is False and r["cuda_init"] is False
    assert r["sigterm_same"] is True and r["threads"] == 0
    assert sorted(p.name for p in mod.iterdir()) == ["train_gpt.py"]
    assert list(cwd.iterdir()) == []
    assert "Warning" not in p.stderr


def test_readme_glossary_lists_every_env_var(tg):
    """Every Config field's env var has a row in the README's glossary (one knob = one documented env var)."""
    from pathlib import Path
    readme = (Path(tg.__file__).parent / "README.md").read_text()
    missing = [f.name.upper() for f in tg.fields(tg.Config) if f"| `{f.name.upper()}` |" not in readme]
    assert not missing, f"README.md glossary lacks {missing}"


def test_cuda_problems_are_named_and_never_fall_back_silently(tg, monkeypatch):
    """DEVICE=cuda on a CPU build, on a CUDA build with an old driver, or without a device: one line naming the
    cause; a CUDA build without a usable GPU and no DEVICE refuses instead of silently running on the CPU."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    cfg = tg.Config.from_env({"PRESET": "cpu", "DEVICE": "cuda"})
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(tg.UserError, match="is a CPU build: install the CUDA build"):
        tg.setup_runtime(cfg, {})
    monkeypatch.setattr(torch.version, "cuda", "12.8")

    def old_driver():
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 11040).")
    monkeypatch.setattr(torch.cuda, "init", old_driver)
    with pytest.raises(tg.UserError, match="driver is too old for this torch"):
        tg.setup_runtime(cfg, {})
    auto = tg.Config.from_env({"PRESET": "cpu"})  # DEVICE unset on a machine with a CUDA build
    with pytest.raises(tg.UserError, match="set DEVICE=cpu to run on the CPU on purpose"):
        tg.setup_runtime(auto, {})
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    assert "no CUDA device visible" in tg.cuda_problem()
    assert tg.setup_runtime(dataclasses.replace(auto, device="cpu"), {}).device.type == "cpu"
