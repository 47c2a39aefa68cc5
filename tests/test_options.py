"Every registered method's options are checked before it runs: a wrong type or a value outside a field's range or choices is a ValueError/TypeError naming the option, raised by the registry (never from inside the method or torch), and a failed `apply` leaves the model as it was. Names work in both spellings."
import dataclasses, json, traceback, types, typing
import pytest, torch
from peftlab.core.models import tiny_llama
from peftlab.core.registry import METHODS, NOT_APPLIED, apply, discover, get_method, method_config, canonical_name, register

discover()   # every category registered so far, including those added after this file was written

WRONG = {int: "abc", float: "abc", bool: "maybe", str: 3, list: 3, dict: 3}

def wrong_type(tp):
    "A value of the wrong type for annotation `tp`; None where every value fits (`Any`)."
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any or isinstance(tp, str): return None
    if origin is typing.Literal: return 12345 if all(isinstance(a, str) for a in args) else "not-a-choice"
    if origin in (typing.Union, types.UnionType):
        vals = {repr(wrong_type(a)): wrong_type(a) for a in args if a is not type(None)}
        return next(iter(vals.values())) if len(vals) == 1 else object()
    kind = origin or tp
    return WRONG.get(kind, object() if isinstance(kind, type) and kind is not object else None)

def _base(tp):
    "`X` of `X|None`."
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1 else tp

def outside(tp, meta)->list:
    "Values outside the field's declared range or choices (none if it declares neither)."
    tp, out = _base(tp), []
    step = 1 if tp is int else 0.5
    if "ge" in meta: out.append(meta["ge"] - step)
    if "gt" in meta: out.append(meta["gt"])
    if "le" in meta: out.append(meta["le"] + step)
    if "lt" in meta: out.append(meta["lt"])
    if typing.get_origin(tp) is typing.Literal or "choices" in meta: out.append("not-a-choice")
    return out

def cases(m)->list:
    "`(field, bad value)` for every field of method `m`'s config."
    hints = typing.get_type_hints(m.config)   # raises where an annotation does not resolve (the registry could not check it)
    out = []
    for f in dataclasses.fields(m.config):
        if not f.init: continue
        tp = hints.get(f.name, typing.Any)
        if (w := wrong_type(tp)) is not None: out.append((f.name, w))
        out += [(f.name, v) for v in outside(tp, f.metadata)]
    return out

def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [(n, type(x)) for n, x in model.named_modules()],
            {k for k in vars(model) if k.startswith("peftlab")})

def same(a, b)->bool:
    return a[1] == b[1] and a[2] == b[2] and a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])

def check_refused(call, method, field, value):
    "`call()` raises a ValueError or TypeError naming `field`, from the registry's check."
    with pytest.raises((ValueError, TypeError)) as e: call()
    where = f"{method}: {field}={value!r}"
    assert field in str(e.value), f"{where}: the error does not name the option: {e.value}"
    assert traceback.extract_tb(e.tb)[-1].filename.endswith("registry.py"), \
        f"{where}: raised from {traceback.extract_tb(e.tb)[-1].filename}, not by the registry's check: {e.value}"

@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_option_is_checked(name):
    m = METHODS[name]
    todo = cases(m)
    if m.category in NOT_APPLIED:   # an optimiser or a scheme: its factory is not apply(model, config)
        for field, value in todo: check_refused(lambda: method_config(m, {field: value}), name, field, value)
        return
    model = tiny_llama()
    before = snapshot(model)
    for field, value in todo:
        check_refused(lambda: apply(model, name, **{field: value}), name, field, value)
        assert same(before, snapshot(model)), f"{name}: {field}={value!r} changed the model"

def test_the_sweep_covers_the_fields():
    "Every typed field gets a wrong value, and every range or Literal an outside one (spot checks)."
    lora = dict(cases(METHODS["lora"]))
    assert set(lora) >= {"r", "alpha", "dropout", "rslora", "init", "targets", "init_options", "rank_pattern"}
    assert "init_data" not in lora   # `Any`: every value fits
    assert ("r", 0) in cases(METHODS["lora"]) and ("dropout", 1) in cases(METHODS["lora"])
    assert ("mode", "not-a-choice") in cases(METHODS["bone"])

@pytest.mark.parametrize("options,exc,message", [
    (dict(r="abc"), TypeError, "option r='abc' of method 'lora' must be an integer >= 1"),
    (dict(r=0), ValueError, "option r=0 of method 'lora' must be >= 1"),
    (dict(dropout=1.0), ValueError, "option dropout=1.0 of method 'lora' must be >= 0 and < 1"),
    (dict(rslora="maybe"), TypeError, "option rslora='maybe' of method 'lora' must be true or false"),
    (dict(dropuot=0.1), TypeError, "unknown option(s) ['dropuot'] for method 'lora'; did you mean 'dropout'?"),
    (dict(rank=8), TypeError, "unknown option(s) ['rank'] for method 'lora'"),
])
def test_messages(options, exc, message):
    with pytest.raises(exc) as e: method_config("lora", options)
    assert message in str(e.value), str(e.value)

def test_command_line_strings_convert():
    c = method_config("lora", dict(r="4", alpha="8", dropout="0.1", rslora="true", targets="q_proj"))
    assert (c.r, c.alpha, c.dropout, c.rslora, c.targets) == (4, 8.0, 0.1, True, "q_proj")
    assert method_config("bone", {"mode": "block"}).mode == "block"
    with pytest.raises(ValueError, match="did you mean 'block'"): method_config("bone", {"mode": "blok"})
    assert method_config("adalora", {"total-step": "10"}).total_step == 10   # `total-step` read as `total_step`

def test_names_one_spelling_both_accepted():
    names = list(METHODS)
    assert names == [canonical_name(n) for n in names]
    for n in names: assert get_method(n.replace("-", "_")) is METHODS[n]
    assert get_method("lora_ga").name == "lora-ga" and get_method("prefix_tuning").name == "prefix-tuning"
    with pytest.raises(KeyError, match="unknown method 'lora-gx'; did you mean .*'lora-ga'"): get_method("lora-gx")

def test_apply_in_both_spellings_and_old_saved_name(tmp_path):
    from peftlab.core.io import save_adapter, load_adapter
    x = torch.randint(0, 100, (1, 5))
    torch.manual_seed(0); a = apply(tiny_llama(), "prefix_tuning", num_virtual_tokens=2)
    torch.manual_seed(0); b = apply(tiny_llama(), "prefix-tuning", num_virtual_tokens=2)
    torch.testing.assert_close(a(x).logits, b(x).logits)
    torch.manual_seed(0); m = apply(tiny_llama(), "lora-xs", r=2, targets=["q_proj"])
    save_adapter(m, tmp_path)
    cfg = json.loads((tmp_path/"adapter_config.json").read_text())
    assert cfg.get("peftlab_method") == "lora-xs", cfg
    cfg["peftlab_method"] = "lora_xs"   # a file written under the old spelling
    (tmp_path/"adapter_config.json").write_text(json.dumps(cfg))
    loaded = load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(loaded(x).logits, m(x).logits)

def test_apply_refuses_an_optimiser():
    @dataclasses.dataclass
    class C: rank: int = dataclasses.field(default=4, metadata=dict(ge=1))   # a rank
    register("toy_galore", category="optim", paper="(none)", config=C)(lambda model, config, lr, weight_decay: None)
    try:
        with pytest.raises(ValueError, match=r"'toy-galore' is an optimiser: pass it to fit\(optimizer='toy-galore'\)"):
            apply(tiny_llama(), "toy_galore")
        assert method_config("toy-galore", dict(rank="8")).rank == 8
    finally: del METHODS["toy-galore"]

@pytest.mark.parametrize("argv,expected", [
    (["--set", "r=abc"], "peftlab: error: --set: option r='abc' of method 'lora' must be an integer >= 1"),
    (["--data", "{csv}"], "pass --prompt-column and --answer-column"),
    (["--method", "prefix_tunig"], "--method: unknown method 'prefix_tunig'; did you mean 'prefix-tuning'"),
])
def test_shell_errors_name_the_flag(tmp_path, argv, expected):
    "The issue's cases typed in a shell: one line, in the command line's terms, before any model loads."
    import os, subprocess, sys
    csv = tmp_path/"qa.csv"; csv.write_text("question,reply\n" + "2+2?,4\n" * 10)
    argv = [a.format(csv=csv) for a in argv]
    r = subprocess.run([sys.executable, "-c", "from peftlab.core.cli import main; main()", "finetune", "--model", "tiny-llama", *argv],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1 and expected in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
