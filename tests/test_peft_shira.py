"SHiRA files go both ways between peftlab and PEFT (outputs equal to 1e-5), and bad files are refused with the base left bare."
import tempfile
import peft, pytest, torch
from safetensors.torch import load_file, save_file
from torch import nn
from peftlab.core.models import tiny_llama
from peftlab.core.registry import apply
from peftlab.core.io import save_adapter, load_adapter
from peftlab.core.adapter import adapters, merge, unmerge
from peftlab.core.surgery import trainable_report
from peftlab.core.testing import assert_close
from peft_roundtrip import perturb

X = torch.randint(3, 1000, (2, 9), generator=torch.Generator().manual_seed(1))

CASES = [dict(r=2, random_seed=3), dict(r=1), dict(r=4, random_seed=0, targets=["q_proj", "down_proj"])]

@pytest.mark.parametrize("kw", CASES)
def test_same_mask_as_peft(kw):
    "Our random mask is PEFT's: the same indices for the same seed (and for no seed)."
    ours = apply(tiny_llama(), "shira", **kw)
    cfg = peft.ShiraConfig(r=kw["r"], random_seed=kw.get("random_seed"), target_modules=kw.get("targets", ["q_proj", "v_proj"]))
    theirs = peft.get_peft_model(tiny_llama(), cfg)
    for n, l in adapters(ours).items():
        pl = theirs.base_model.model.get_submodule(n)
        rc = pl.shira_indices["default"].long()
        assert torch.equal(rc[0] * l.in_features + rc[1], l.sparse_indices)
    assert trainable_report(ours).trainable == sum(p.numel() for p in theirs.parameters() if p.requires_grad)

@pytest.mark.parametrize("kw", CASES + [dict(r=2, mask_type="magnitude")])
def test_peft_loads_ours(kw):
    ours = perturb(apply(tiny_llama(), "shira", **kw))
    d = tempfile.mkdtemp(); save_adapter(ours, d)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), d)
    assert_close(theirs(X).logits, ours(X).logits)

@pytest.mark.parametrize("kw", CASES)
def test_we_load_peft(kw):
    cfg = peft.ShiraConfig(r=kw["r"], random_seed=kw.get("random_seed"), target_modules=kw.get("targets", ["q_proj", "v_proj"]))
    theirs = perturb(peft.get_peft_model(tiny_llama(), cfg))
    d = tempfile.mkdtemp(); theirs.save_pretrained(d)
    ours = load_adapter(tiny_llama(), d)
    assert ours.peftlab_method[0] == "shira"
    assert_close(ours(X).logits, theirs(X).logits)

def test_we_load_a_peft_custom_mask():
    "A PEFT adapter whose mask came from a user function: the indices in its file are the ones we train."
    def rows_mask(base_layer, r, **kw):
        m = torch.zeros_like(base_layer.weight); k = r * (base_layer.in_features + base_layer.out_features)
        m.view(-1)[:k] = 1; return m
    cfg = peft.ShiraConfig(r=2, mask_type="first_rows", target_modules=["q_proj"]); cfg.mask_fn = rows_mask
    theirs = perturb(peft.get_peft_model(tiny_llama(), cfg))
    d = tempfile.mkdtemp(); theirs.save_pretrained(d)
    ours = load_adapter(tiny_llama(), d)
    assert ours.peftlab_method[1].mask_type == "custom"
    assert torch.equal(ours.model.layers[0].self_attn.q_proj.sparse_indices, torch.arange(256))
    assert_close(ours(X).logits, theirs(X).logits)

def test_merge_unmerge_like_peft():
    ours = perturb(apply(tiny_llama(), "shira", r=2, random_seed=1))
    out = ours(X).logits
    w = {n: a.base_layer.weight.detach().clone() for n, a in adapters(ours).items()}
    merge(ours); assert_close(ours(X).logits, out, rtol=1e-4, atol=1e-4)
    unmerge(ours)
    for n, a in adapters(ours).items(): assert_close(a.base_layer.weight, w[n], rtol=1e-5, atol=1e-6)

def test_training_grads_match_peft():
    "The gathered gradient of the values equals PEFT's (autograd through a dense weight)."
    ours = perturb(apply(tiny_llama(), "shira", r=2, random_seed=5))
    d = tempfile.mkdtemp(); save_adapter(ours, d)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), d, is_trainable=True)
    ours(X, labels=X).loss.backward(); theirs(X, labels=X).loss.backward()
    for n, l in adapters(ours).items():
        assert_close(l.sparse_values.grad, theirs.base_model.model.get_submodule(n).shira_weight["default"].grad)

@pytest.mark.parametrize("change,error", [
    (lambda sd, k: sd[k].__setitem__((0, 0), 40), "indices out of range"),
    (lambda sd, k: sd.__setitem__(k, sd[k][:, :-1].contiguous()), "values for"),
    (lambda sd, k: sd.pop(k), "lacks the weight or indices"),
])
def test_bad_files_are_refused_and_the_base_stays(change, error):
    ours = perturb(apply(tiny_llama(), "shira", r=2, random_seed=3))
    d = tempfile.mkdtemp(); save_adapter(ours, d)
    sd = load_file(f"{d}/adapter_model.safetensors")
    change(sd, "base_model.model.model.layers.1.self_attn.v_proj.shira_indices")
    save_file(sd, f"{d}/adapter_model.safetensors")
    base = tiny_llama(); before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises((ValueError, KeyError), match=error): load_adapter(base, d)
    assert not hasattr(base, "peftlab_method") and type(base.model.layers[1].self_attn.v_proj) is nn.Linear
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())

def test_r_too_large_and_bad_options():
    with pytest.raises(ValueError, match="choose r <= 21"): apply(tiny_llama(), "shira", r=30, targets=["v_proj"])
    with pytest.raises(ValueError, match="needs data"): apply(tiny_llama(), "shira", mask_type="snip")
