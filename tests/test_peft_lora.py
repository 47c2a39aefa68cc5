"LoRA files go both ways between peftlab and PEFT, with the same outputs (1e-5)."
import pytest, torch
import peft
from peftlab.core.models import tiny_llama
from peftlab.core.registry import apply
from peftlab.core.adapter import adapters, merge, unmerge
from peftlab.core.io import save_adapter, load_adapter
from peftlab.core.testing import assert_close

CASES = [  # r, alpha, targets, rslora, dropout
    (1, 1, ["q_proj"], False, 0.0),
    (4, 8, ["q_proj", "v_proj"], False, 0.0),
    (8, 16, "all-linear", True, 0.1),
    (16, 32, ["k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False, 0.0),
    (8, 4, r".*layers\.1\..*(q|v)_proj", True, 0.0),
]
X = torch.randint(0, 49152, (2, 11))

def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_" in n:
            with torch.no_grad(): p.copy_(torch.randn(p.shape, generator=g) * 0.05)

@pytest.mark.parametrize("r,alpha,targets,rslora,dropout", CASES)
def test_peftlab_to_peft(tmp_path, r, alpha, targets, rslora, dropout):
    ours = apply(tiny_llama(), "lora", r=r, alpha=alpha, targets=targets, rslora=rslora, dropout=dropout).eval()
    _randomise(ours, r)
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert_close(theirs(X).logits, ours(X).logits)

@pytest.mark.parametrize("r,alpha,targets,rslora,dropout", CASES)
def test_peft_to_peftlab(tmp_path, r, alpha, targets, rslora, dropout):
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, lora_dropout=dropout)
    theirs = peft.get_peft_model(tiny_llama(), cfg).eval()
    _randomise(theirs, r)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(tiny_llama(), tmp_path).eval()
    assert_close(ours(X).logits, theirs(X).logits)
    assert len(adapters(ours)) == sum("lora_A" in n for n, _ in theirs.named_modules() if n.endswith("lora_A"))

@pytest.mark.parametrize("r,alpha,targets,rslora,dropout", CASES)
def test_merge_unmerge_identity(r, alpha, targets, rslora, dropout):
    model = apply(tiny_llama(), "lora", r=r, alpha=alpha, targets=targets, rslora=rslora).eval()
    _randomise(model, r)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = model(X).logits
    merge(model)
    assert_close(model(X).logits, out, rtol=1e-4, atol=1e-4)  # merged sums are taken in another order
    unmerge(model)
    for n, p in model.named_parameters(): assert_close(p, before[n], msg=n)

PATTERNS = dict(rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 6}, alpha_pattern={r"layers\.0\..*v_proj": 32})

def test_rank_and_alpha_patterns_both_ways(tmp_path):
    ours = apply(tiny_llama(), "lora", r=4, alpha=8, targets="all-linear", **PATTERNS).eval()
    _randomise(ours, 3)
    save_adapter(ours, tmp_path/"ours")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path/"ours").eval()
    assert_close(theirs(X).logits, ours(X).logits)
    theirs.save_pretrained(tmp_path/"theirs")
    back = load_adapter(tiny_llama(), tmp_path/"theirs").eval()
    assert_close(back(X).logits, ours(X).logits)
    a = adapters(back)
    assert (a["model.layers.1.mlp.down_proj"].r, a["model.layers.0.self_attn.q_proj"].r, a["model.layers.0.self_attn.v_proj"].scaling) == (6, 2, 8.0)

def test_gradients_reach_only_lora():
    model = apply(tiny_llama(), "lora", r=4, targets="all-linear")
    model(X, labels=X).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(n.split(".")[-2] in ("lora_A", "lora_B") for n in with_grad)

BAD = [  # what is wrong, kwargs, message fragment
    ("unknown target", dict(targets=["nope"]), "no module matched"),
    ("rank too large", dict(r=65, targets=["q_proj"]), "choose 1 <= r <= 64"),
    ("unsupported layer", dict(targets=["embed_tokens"]), "cannot wrap"),
    ("misspelt option", dict(rank=4), "valid options"),
    ("unknown init", dict(init="nope"), "unknown LoRA init"),
]

@pytest.mark.parametrize("what,kwargs,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_config(what, kwargs, fragment):
    with pytest.raises(Exception, match=fragment.replace("(", r"\(")): apply(tiny_llama(), "lora", **kwargs)

def test_corrupt_and_mismatched_files_leave_base_untouched(tmp_path):
    model = apply(tiny_llama(), "lora", r=4, targets="all-linear"); _randomise(model, 0)
    save_adapter(model, tmp_path)
    base = tiny_llama(intermediate_size=96); ref = base(X).logits
    with pytest.raises(ValueError, match="shape mismatch"): load_adapter(base, tmp_path)
    assert adapters(base) == {}
    assert_close(base(X).logits, ref)
    assert not (base._forward_hooks or base._forward_pre_hooks or "generate" in vars(base) or hasattr(base, "_peftlab_adapter_names"))  # no hooks left behind
    (tmp_path/"adapter_model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="corrupt"): load_adapter(base, tmp_path)
    (tmp_path/"adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"): load_adapter(base, tmp_path)

@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_saved_weight_inits_load(tmp_path, init):
    "PEFT leaves the rewritten base out of its files and re-runs the init on load; so does load_adapter."
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=init,
                                                               target_modules=["q_proj", "v_proj"])).eval()
    _randomise(theirs, 3)
    theirs.save_pretrained(tmp_path)
    assert_close(load_adapter(tiny_llama(), tmp_path).eval()(X).logits, theirs(X).logits)
