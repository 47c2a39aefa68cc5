"`peftlab merge` with a rule (flags and mergekit-style YAML), its usage errors (exit status 2), and `peftlab bench --family merge`."
import json, os, subprocess, sys
from pathlib import Path
import pytest
import torch
import peftlab as pl
from peftlab.core.cli import main
from peftlab.core.models import tiny_llama
from peftlab.merge.config import MergeConfigError, adapter_task_vector
from peftlab.merge.task_vectors import model_weights, task_vector
from peftlab.merge.tensors import MERGE_RULES, merge_task_vectors, merge_tensors

def lora_adapter(path, seed, targets=("q_proj", "v_proj"), base="tiny-llama"):
    "A LoRA adapter on tiny-llama with a random (non-zero) update, recording its base as `peftlab finetune` does."
    m = pl.apply(tiny_llama(seed=0), "lora", r=4, targets=list(targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n: p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pl.save_adapter(m, path)
    (Path(path)/"run_config.yaml").write_text(f"model: {base}\n")
    return str(path)

def noisy_model(path, seed):
    "tiny-llama with small noise on every weight, saved as a Hugging Face directory (a full fine-tuned model)."
    m, g = tiny_llama(seed=0), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters(): p.add_(torch.randn(p.shape, generator=g) * 0.01)
    m.save_pretrained(path)
    return str(path)

def wide_model(path):
    "tiny-llama with another MLP width: a model of another shape than the base."
    tiny_llama(seed=0, intermediate_size=96).save_pretrained(path)
    return str(path)

@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("merge")
    return dict(d=d, a=lora_adapter(d/"a", 1), b=lora_adapter(d/"b", 2), mlp=lora_adapter(d/"mlp", 3, ("up_proj",)),
                other=lora_adapter(d/"other", 4, base="smollm2-135m"), ft=noisy_model(d/"ft", 5), ft2=noisy_model(d/"ft2", 6),
                wide=wide_model(d/"wide"))

def weights_of(directory):
    from transformers import AutoModelForCausalLM
    return model_weights(AutoModelForCausalLM.from_pretrained(directory))

def assert_merged(directory, tvs, weights, method, **options):
    "The saved model equals tiny-llama plus `merge_task_vectors` of `tvs` computed here."
    want = model_weights(merge_task_vectors(tvs, weights, method, **options).apply_to(tiny_llama(seed=0)))
    got = weights_of(directory)
    for k, v in want.items(): torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)

def test_ties_from_flags_is_merge_task_vectors(dirs):
    out = dirs["d"]/"ties"
    main(["merge", "--method", "ties", "--adapter", dirs["a"], "--adapter", dirs["b"], "--weights", "0.5,0.5",
          "--density", "0.5", "--lambda", "1.5", "--majority-sign", "frequency", "--out", str(out)])  # base: recorded
    base = tiny_llama(seed=0)
    tvs = [adapter_task_vector(base, dirs[k])[0] for k in "ab"]
    assert_merged(out, tvs, [0.5, 0.5], "ties", density=0.5, scale=1.5, majority_sign_method="frequency")
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".ties.")]        # written atomically
    again = dirs["d"]/"again"
    main(["merge", "--config", str(out/"merge_config.yaml"), "--out", str(again)])     # the saved config repeats it
    assert_merged(again, tvs, [0.5, 0.5], "ties", density=0.5, scale=1.5, majority_sign_method="frequency")

def test_yaml_mixes_models_and_adapters_with_mergekit_numbers(dirs):
    cfg = dirs["d"]/"dare.yaml"
    cfg.write_text(f"""merge_method: dare_ties
base_model: tiny-llama
models:
  - model: tiny-llama          # the base, listed as mergekit allows: left out
  - model: {dirs['ft']}
    parameters: {{weight: 0.7, density: 0.4}}
  - model: {dirs['a']}
    parameters: {{weight: 0.3, density: 0.4}}
parameters: {{lambda: 0.9, int8_mask: true}}
seed: 7
""")
    out = dirs["d"]/"dare"
    main(["merge", "--config", str(cfg), "--out", str(out)])
    base = tiny_llama(seed=0)
    from transformers import AutoModelForCausalLM
    tvs = [task_vector(base, AutoModelForCausalLM.from_pretrained(dirs["ft"])), adapter_task_vector(base, dirs["a"])[0]]
    torch.manual_seed(7)
    assert_merged(out, tvs, [0.7, 0.3], "dare_ties", density=0.4, scale=0.9, variant="mergekit")

def test_one_adapter_without_method_folds_it_as_before(dirs):
    out = main(["merge", "--model", "tiny-llama", "--adapter", dirs["a"], "--out", str(dirs["d"]/"one")])
    pos = main(["merge", dirs["a"], "--model", "tiny-llama", "--out", str(dirs["d"]/"one_positional")])
    tv, _ = adapter_task_vector(tiny_llama(seed=0), dirs["a"])
    assert_merged(out, [tv], None, "task_arithmetic")
    assert_merged(pos, [tv], None, "task_arithmetic")
    assert not (out/"merge_config.yaml").exists()

BAD = [  # (flags after `merge --out X`, or a YAML text; what the message says)
    (["--method", "ties", "--adapter", "{a}", "--density", "0.5"], "merges two or more models, got 1"),
    (["--method", "ties", "{a}", "{b}", "--weights", "1,2,3", "--density", "0.5"], "--weights has 3 values for 2 adapters"),
    (["--method", "ties", "{a}", "{b}", "--weights", "1,x"], "must be numbers separated by commas"),
    (["--method", "dare_tie", "{a}", "{b}"], "unknown merge method 'dare_tie'; did you mean 'dare_ties'"),
    (["--method", "ties", "{a}", "{b}", "--density", "0"], "density=0.0 of merge method 'ties' must be > 0 and <= 1"),
    (["--method", "ties", "{a}", "{b}"], "needs density="),
    (["--method", "ties", "{a}", "{other}", "--density", "0.5"], "trained on different bases"),
    (["--method", "ties", "{a}", "{mlp}", "--density", "0.5"], "adapt different modules"),
    (["--method", "ties", "{a}", "{d}/missing", "--density", "0.5"], "no model or adapter at"),
    (["{a}", "{b}"], "without --method folds one adapter into its base, got 2"),
    (["{a}", "--weights", "1"], "--weights is an option of a merge by rule"),
    ("merge_method: ties\nmodels: [{{model: '{a}', parameters: {{density: 0.5}}}}, {{model: '{b}', parameters: {{density: 0.3}}}}]\n",
     "density differs between models"),
    ("merge_method: ties\nbase_modle: tiny-llama\n", "unknown key 'base_modle'; did you mean 'base_model'"),
    ("merge_method: ties\nmodels: ['{a}', '{b}']\nparameters: {{density: 0.5, lamda: 2}}\n", "did you mean 'lambda'"),
    # the number of models each rule takes
    (["--method", "nearswap", "{a}", "{b}", "--set", "t=0.01"], "'nearswap' takes exactly 1 fine-tuned model besides the base, got 2"),
    ("merge_method: arcee_fusion\nbase_model: tiny-llama\nmodels: [tiny-llama, '{ft}', '{ft2}']\n", "'arcee_fusion' takes exactly 1 fine-tuned model besides the base, got 2"),
    ("merge_method: nuslerp\nbase_model: tiny-llama\nmodels: ['{ft}']\n", "'nuslerp' takes exactly 2 fine-tuned models besides the base, got 1"),
    ("merge_method: nearswap\nbase_model: tiny-llama\nmodels: ['{ft}']\n", "merge method 'nearswap' needs t="),
    # densities outside (0, 1], weights that do not sum as the rule needs
    ("merge_method: dare_ties\nmodels: [{{model: '{a}', parameters: {{density: 1.5}}}}, {{model: '{b}', parameters: {{density: 1.5}}}}]\n",
     "density=1.5 of merge method 'dare_ties' must be > 0 and <= 1"),
    (["--method", "ties", "{a}", "{b}", "--density", "-0.2"], "density=-0.2 of merge method 'ties' must be > 0 and <= 1"),
    ("merge_method: linear\nmodels: [{{model: '{a}', parameters: {{weight: 1}}}}, {{model: '{b}', parameters: {{weight: -1}}}}]\n",
     "linear normalises by the sum of the weights, which is 0"),
    ("merge_method: multislerp\nmodels: [{{model: '{a}', parameters: {{weight: 1}}}}, {{model: '{b}', parameters: {{weight: -1}}}}]\n",
     "'multislerp' normalizes the weights by their sum, which is 0"),
    (["--method", "karcher", "{a}", "{b}", "--weights", "1,-1"], "'karcher' needs positive weights"),
    # models of another architecture or shape
    (["--method", "ties", "--model", "tiny-llama", "{ft}", "{wide}", "--density", "0.5"],
     "wide does not fit the base tiny-llama: key 'model.layers.0.mlp.gate_proj.weight' has shape (128, 64)"),
]

@pytest.mark.parametrize("flags,message", BAD)
def test_merge_mistakes_name_the_fix(dirs, flags, message):
    names = {k: str(v) for k, v in dirs.items()}
    if isinstance(flags, str):
        cfg = dirs["d"]/"bad.yaml"; cfg.write_text(flags.format(**names)); flags = ["--config", str(cfg)]
    argv = ["merge", "--out", str(dirs["d"]/"never")] + [f.format(**names) for f in flags]
    with pytest.raises(MergeConfigError, match=None) as e: main(argv)
    assert message in str(e.value) and e.value.exit_code == 2
    assert not (dirs["d"]/"never").exists()

def test_shell_exits_2_with_one_line(dirs):
    r = subprocess.run([sys.executable, "-m", "peftlab.core.cli", "merge", "--method", "ties", dirs["a"], dirs["b"],
                        "--weights", "1,1,1", "--out", str(dirs["d"]/"never")], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip() == "peftlab: error: --weights has 3 values for 2 adapters: give one weight per --adapter"

def test_bench_merge_family(tmp_path, capsys):
    out = tmp_path/"merge.json"
    res = main(["bench", "--family", "merge", "--tasks", "record_format,iso_date", "--steps", "3", "--n-train", "8",
                "--n-test", "8", "--json", str(out)])
    t = res.table
    assert {"base", "specialist record_format", "specialist iso_date", "multi-task", "average"} <= set(t.index)
    assert set(t["rule"].dropna()) | set(t.attrs["skipped"]) == set(MERGE_RULES)      # every rule merged, or skipped with why
    assert {"ties", "dare_ties", "task_arithmetic", "slerp", "nuslerp"} <= set(t.index) and t["eval_loss"].notna().all()
    assert {"nearswap record_format", "arcee_fusion iso_date"} <= set(t.index) and list(t.attrs["skipped"]) == ["passthrough"]
    assert t.loc["slerp", "merged"] == "record_format, iso_date" and t.loc["nearswap iso_date", "merged"] == "iso_date"
    saved = json.loads(out.read_text())
    assert {r["index"] for r in saved["table"]} == set(t.index) and "results written to" in capsys.readouterr().out

@pytest.mark.parametrize("method,parameters,pair", [("nearswap", "{t: 0.005}", False), ("arcee_fusion", "{}", False),
                                                    ("slerp", "{t: 0.3}", True)])
def test_yaml_of_the_base_and_one_model_is_merge_tensors(dirs, method, parameters, pair):
    "mergekit's YAML for nearswap, arcee_fusion and slerp names the base and one other model; the merge is merge_tensors on their weights."
    cfg = dirs["d"]/f"{method}.yaml"
    cfg.write_text(f"merge_method: {method}\nbase_model: tiny-llama\nmodels:\n  - model: tiny-llama\n  - model: {dirs['ft']}\n"
                   f"parameters: {parameters}\n")
    out = dirs["d"]/method
    main(["merge", "--config", str(cfg), "--out", str(out)])
    from transformers import AutoModelForCausalLM
    base, tuned = model_weights(tiny_llama(seed=0)), model_weights(AutoModelForCausalLM.from_pretrained(dirs["ft"]))
    options = dict(t=float(parameters.strip("{}").split(":")[1])) if "t:" in parameters else {}
    got = weights_of(out)
    torch.manual_seed(0)                       # the config's seed: arcee_fusion samples the quartiles of a tensor over 10⁶ entries
    for k, v in base.items():
        want = merge_tensors([v, tuned[k]], None, method, **options) if pair else merge_tensors([tuned[k]], None, method, base=v, **options)
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6, msg=k)
    if method == "arcee_fusion":                # it keeps some of the update, not all of it
        kept = sum(int((got[k] != v).sum()) for k, v in base.items()) / sum(v.numel() for v in base.values())
        assert 0 < kept < 0.5

def test_one_model_rule_from_flags(dirs):
    out = dirs["d"]/"nearswap_flags"
    main(["merge", "--method", "nearswap", "--model", "tiny-llama", "--adapter", dirs["a"], "--set", "t=0.001", "--out", str(out)])
    base = tiny_llama(seed=0)
    tv, _ = adapter_task_vector(base, dirs["a"])
    got = weights_of(out)
    for k, v in model_weights(base).items():
        torch.testing.assert_close(got[k], merge_tensors([v + tv[k]], None, "nearswap", base=v, t=0.001), rtol=1e-5, atol=1e-6, msg=k)
