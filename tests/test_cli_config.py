"`peftlab finetune --config`: the file's settings, the flags over them, bad files refused before anything runs; `--print-config`, `run_config.yaml`, `--fsdp`, `--gradient-checkpointing` and rank 0."
import json, os, subprocess, sys
from pathlib import Path
import pytest, yaml
from peftlab.core.cli import main, parse_args, run_config, fit_flags, RUN_CONFIG

TINY = ["--model", "tiny-llama", "--steps", "1", "--n-train", "8", "--n-test", "1", "--max-new-tokens", "2"]

# (file content, extra argv, expected settings)
CASES = [
    ("steps: 7\nlr: 0.01\n", [], dict(steps=7, lr=0.01)),
    ("steps: 7\n", ["--steps", "3"], dict(steps=3)),                                       # the flag wins
    ("n-train: 12\nbatch_size: 2\n", [], dict(n_train=12, batch_size=2)),                  # either spelling
    ("options: {r: 4, alpha: 8}\n", ["--set", "r=2"], dict(options={"r": 2, "alpha": 8})), # --set over the file's options
    ("set: [r=4, 'targets=all-linear']\n", [], dict(options={"r": 4, "targets": "all-linear"})),
    ("method: ia3\n", [], dict(method="ia3", options={})),                                # no demo LoRA options for ia3
    ("fsdp: true\ngradient_checkpointing: true\n", [], dict(fsdp=True, gradient_checkpointing=True)),
    ('{"steps": 5, "model": "tiny-llama"}', [], dict(steps=5, model="tiny-llama")),      # JSON
    ("", [], dict(steps=parse_args(["finetune"]).steps)),                                 # an empty file changes nothing
]

@pytest.mark.parametrize("content,argv,expected", CASES)
def test_file_then_flags(tmp_path, content, argv, expected):
    (tmp_path/"run.yaml").write_text(content)
    args = parse_args(["finetune", "--config", str(tmp_path/"run.yaml"), *argv])
    assert {k: getattr(args, k) for k in expected} == expected

@pytest.mark.parametrize("content,message", [
    ("stepz: 3\nlearning_rate: 0.1\n", "unknown key(s) ['learning_rate', 'stepz']; valid keys: ["),
    ("steps: many\n", "steps='many' is not a valid int"),
    ("fsdp: 1\n", "fsdp must be true or false"),
    ("options: 8\n", "options must be a mapping"),
    ("- a\n- b\n", "must hold a mapping of settings"),
    ("steps: [\n", "is not valid YAML or JSON"),
])
def test_bad_file_is_refused_and_nothing_runs(tmp_path, content, message):
    (tmp_path/"run.yaml").write_text(content)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        main(["finetune", "--config", str(tmp_path/"run.yaml"), *TINY, "--out", str(tmp_path/"out")])
    assert not (tmp_path/"out").exists()

def test_unknown_key_names_every_valid_key(tmp_path):
    (tmp_path/"run.yaml").write_text("stepz: 3\n")
    with pytest.raises(ValueError) as e: main(["finetune", "--config", str(tmp_path/"run.yaml")])
    for key in ["steps", "lr", "model", "options", "fsdp", "gradient_checkpointing", "n_train", "out"]: assert f"'{key}'" in str(e.value)

def test_shell_gets_one_line(tmp_path):
    (tmp_path/"run.yaml").write_text("stepz: 3\n")
    r = subprocess.run([sys.executable, "-c", "from peftlab.core.cli import main; main()", "finetune", "--config", str(tmp_path/"run.yaml")],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1 and r.stderr.strip().startswith("peftlab: error: ") and "unknown key(s) ['stepz']" in r.stderr
    assert "Traceback" not in r.stderr

def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config file"): main(["finetune", "--config", str(tmp_path/"none.yaml")])

def test_print_config_prints_and_runs_nothing(tmp_path, capsys):
    (tmp_path/"run.yaml").write_text(f"model: tiny-llama\nsteps: 4\nout: {tmp_path/'out'}\n")
    cfg = main(["finetune", "--config", str(tmp_path/"run.yaml"), "--lr", "0.5", "--print-config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == cfg and cfg["steps"] == 4 and cfg["lr"] == 0.5 and cfg["model"] == "tiny-llama"
    assert not (tmp_path/"out").exists()
    assert set(cfg) >= {"model", "task", "method", "options", "steps", "lr", "batch_size", "out", "fsdp", "gradient_checkpointing"}
    assert "config" not in cfg and "print_config" not in cfg

def test_run_writes_its_config_and_the_file_repeats_it(tmp_path, capsys):
    out = tmp_path/"adapter"
    main(["finetune", *TINY, "--set", "r=2", "--lr", "0.001", "--out", str(out)])
    saved = yaml.safe_load((out/RUN_CONFIG).read_text())
    assert saved["options"] == {"r": 2} and saved["lr"] == 0.001 and saved["out"] == str(out) and saved["steps"] == 1
    capsys.readouterr()
    assert main(["finetune", "--config", str(out/RUN_CONFIG), "--print-config"]) == saved

def test_distributed_flags_parse_and_reach_fit():
    args = parse_args(["finetune", "--fsdp", "--gradient-checkpointing"])
    assert args.fsdp and args.gradient_checkpointing
    assert not parse_args(["finetune"]).fsdp
    def fit(model, data, steps, fsdp=False, gradient_checkpointing=False): pass
    assert fit_flags(args, fit) == dict(fsdp=True, gradient_checkpointing=True)
    assert fit_flags(parse_args(["finetune"]), fit) == {}
    def old_fit(model, data, steps): pass
    with pytest.raises(ValueError, match="has no 'fsdp' option: run without --fsdp"): fit_flags(args, old_fit)

def test_only_rank_0_prints_evaluates_and_saves(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")  # as torchrun sets it; WORLD_SIZE unset, so fit trains alone
    res = main(["finetune", *TINY, "--set", "r=2", "--out", str(tmp_path/"out")])
    assert res == dict(before=None, after=None)
    assert capsys.readouterr().out == "" and not (tmp_path/"out").exists()
    monkeypatch.setenv("RANK", "0")
    res = main(["finetune", *TINY, "--set", "r=2", "--out", str(tmp_path/"out")])
    assert res["after"] is not None and (tmp_path/"out"/RUN_CONFIG).exists()
    assert "before:" in capsys.readouterr().out

def test_gradient_checkpointing_run(tmp_path, capsys):
    out = tmp_path/"out"
    res = main(["finetune", *TINY, "--set", "r=2", "--gradient-checkpointing", "--out", str(out)])
    assert res["after"] is not None and yaml.safe_load((out/RUN_CONFIG).read_text())["gradient_checkpointing"] is True
