"P-tuning and adaption prompts (LLaMA-Adapter) against PEFT: files both ways with the same logits (1e-5), the same encoder and generation, and PEFT options peftlab does not support refused by name with the base unchanged."
import copy, json, re
import peft, pytest, torch
from peftlab.core.models import tiny_llama as _tiny_llama
from peftlab.core.registry import apply
from peftlab.core.io import save_adapter, load_adapter
from peftlab.core.testing import assert_close
from peft_roundtrip import perturb, inputs

_BASE = _tiny_llama()
def tiny_llama(**overrides):
    "A fresh tiny-llama: a copy of one built once (building its random weights costs more than the tests themselves)."
    return _tiny_llama(**overrides) if overrides else copy.deepcopy(_BASE)

# (peftlab method, its options, PEFT's config of the same adapter)
P_TUNING = [
    dict(num_virtual_tokens=4),                                                   # MLP, width d (PEFT's default)
    dict(num_virtual_tokens=5, encoder_reparameterization_type="LSTM", encoder_hidden_size=8, encoder_num_layers=1),
    dict(num_virtual_tokens=2, encoder_reparameterization_type="LSTM", encoder_hidden_size=12, encoder_num_layers=2, encoder_dropout=0.1),
]
ADAPTION = [dict(adapter_len=3, adapter_layers=1), dict(adapter_len=5, adapter_layers=2)]
CASES = ([("p-tuning", kw, lambda kw=kw: peft.PromptEncoderConfig(task_type="CAUSAL_LM", **kw)) for kw in P_TUNING] +
         [("adaption-prompt", kw, lambda kw=kw: peft.AdaptionPromptConfig(task_type="CAUSAL_LM", **kw)) for kw in ADAPTION])
IDS = [f"{c[0]}-{i}" for i, c in enumerate(CASES)]

def logits(model): return model(**inputs()).logits

def opened(model, seed=0):
    "Random values in every trainable tensor; adaption gates well away from zero, so the prompts count."
    return perturb(model, seed, std=0.5)

@pytest.mark.parametrize("name,kw,peft_cfg", CASES, ids=IDS)
def test_peft_loads_ours(name, kw, peft_cfg, tmp_path):
    torch.manual_seed(0)
    ours = opened(apply(tiny_llama(), name, **kw)).eval()
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert_close(logits(theirs), logits(ours))
    assert (logits(ours)[:, -9:] - tiny_llama()(**inputs()).logits).abs().max() > 1e-3   # the adapter changes the outputs
    gen = dict(**inputs(), max_new_tokens=4, do_sample=False)
    assert torch.equal(theirs.generate(**gen), ours.generate(**gen))

@pytest.mark.parametrize("name,kw,peft_cfg", CASES, ids=IDS)
def test_we_load_peft(name, kw, peft_cfg, tmp_path):
    torch.manual_seed(0)
    theirs = opened(peft.get_peft_model(tiny_llama(), peft_cfg())).eval()   # in training mode: P-tuning through PEFT's encoder
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(tiny_llama(), tmp_path)
    assert ours.peftlab_method[0] == name
    assert_close(logits(ours), logits(theirs))

@pytest.mark.parametrize("kw", P_TUNING[1:], ids=["lstm-1", "lstm-2"])
def test_encoder_computes_what_peft_computes(kw):
    "PEFT's trained encoder state, copied into ours, gives the same logits and the same gradients on the embeddings."
    torch.manual_seed(0)
    theirs = opened(peft.get_peft_model(tiny_llama(), peft.PromptEncoderConfig(task_type="CAUSAL_LM", **kw))).eval()
    ours = apply(tiny_llama(), "p-tuning", **kw).eval()
    ours.prompt_tuning.load_state_dict(theirs.prompt_encoder["default"].state_dict())
    labels = inputs()["input_ids"]
    mine, peft_out = ours(**inputs(), labels=labels), theirs(**inputs(), labels=labels)
    assert_close(mine.logits, peft_out.logits)
    mine.loss.backward(); peft_out.loss.backward()
    assert_close(ours.prompt_tuning.embedding.weight.grad, theirs.prompt_encoder["default"].embedding.weight.grad, rtol=1e-4, atol=1e-6)  # float32 backward through the model

def test_adaption_prompt_starts_as_the_base_and_trains_its_gate():
    "Zero-init: the adapted model is the base; the first gradient reaches the gates only."
    m = apply(tiny_llama(), "adaption-prompt", adapter_len=4, adapter_layers=2)
    out = m(**inputs(), labels=inputs()["input_ids"])
    assert_close(out.logits, tiny_llama()(**inputs()).logits)
    out.loss.backward()
    grads = {n: p.grad.abs().sum().item() for n, p in m.named_parameters() if p.requires_grad}
    assert all((g > 0) == n.endswith("adaption_gate") for n, g in grads.items()), grads

UNSUPPORTED = [  # (the PEFT file's method and config, a change to its adapter_config.json, the option as the error names it)
    ("P_TUNING", lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=2), {"num_transformer_submodules": 2}, "num_transformer_submodules=2"),
    ("P_TUNING", lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=2), {"encoder_init": "text"}, "encoder_init='text'"),
    ("ADAPTION_PROMPT", lambda: peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=2, adapter_layers=1), {"target_modules": "attn"}, "target_modules='attn'"),
    ("ADAPTION_PROMPT", lambda: peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=2, adapter_layers=1), {"gate_per_head": True}, "gate_per_head=True"),
]

@pytest.mark.parametrize("peft_type,peft_cfg,change,option", UNSUPPORTED, ids=[o.split("=")[0] for *_, o in UNSUPPORTED])
def test_unsupported_peft_option_is_refused(peft_type, peft_cfg, change, option, tmp_path):
    "An option peftlab does not support (or does not know, as a later PEFT might write) is refused by name; nothing changes."
    peft.get_peft_model(tiny_llama(), peft_cfg()).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path/"adapter_config.json").read_text())
    (tmp_path/"adapter_config.json").write_text(json.dumps({**cfg, **change}))
    base = tiny_llama()
    before, modules = {k: v.clone() for k, v in base.state_dict().items()}, [(n, type(m)) for n, m in base.named_modules()]
    with pytest.raises(ValueError, match=re.escape(f"{peft_type} option {option} (written by PEFT {peft.__version__})")):
        load_adapter(base, tmp_path)
    assert [(n, type(m)) for n, m in base.named_modules()] == modules and not hasattr(base, "peftlab_method")
    assert not hasattr(base, "prompt_tuning") and all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())

@pytest.mark.parametrize("name,kw,msg", [
    ("p-tuning", dict(num_virtual_tokens=0), "must be >= 1"),
    ("p-tuning", dict(encoder_reparameterization_type="GRU"), "must be one of 'MLP', 'LSTM'"),
    ("p-tuning", dict(encoder_num_layers=3), "applies to the LSTM encoder only"),
    ("p-tuning", dict(encoder_reparameterization_type="LSTM", encoder_num_layers=1, encoder_dropout=0.2), "acts between LSTM layers only"),
    ("adaption-prompt", dict(adapter_layers=5), "the model has 2 attention layers: choose at most 2"),
])
def test_config_errors(name, kw, msg):
    with pytest.raises((ValueError, TypeError), match=msg): apply(tiny_llama(), name, **kw)

def test_a_file_for_another_model_changes_nothing(tmp_path):
    save_adapter(apply(tiny_llama(), "adaption-prompt", adapter_len=2, adapter_layers=2), tmp_path/"ap")
    save_adapter(apply(tiny_llama(), "p-tuning", num_virtual_tokens=2), tmp_path/"pt")
    for d, msg in [("ap", r"this model needs \(1, 2, 32\)"), ("pt", r"this model needs \(2, 32\)")]:
        base = tiny_llama(hidden_size=32)
        with pytest.raises(ValueError, match=msg): load_adapter(base, tmp_path/d)
        assert not hasattr(base, "peftlab_method") and not hasattr(base, "prompt_tuning")
        assert type(base.model.layers[1].self_attn).__name__ == "LlamaAttention"
