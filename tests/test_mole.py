"""Mixtures of LoRA experts (merge.mixlora, merge.xlora): the load-balancing loss against transformers' Mixtral
loss; save/load round trips of every mixture on tiny-llama (routers, gates and classifier included); X-LoRA
against PEFT's XLoraModel over the same LoRA files and classifier weights (logits and scalings, 1e-5); training
through `fit` reaches the routers and nothing frozen; bad input fails with a message naming the fix."""
import copy
import pytest, torch
from torch import nn
import peft
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from peftlab.core.models import tiny_llama
from peftlab.core.registry import apply
from peftlab.core.adapter import adapters
from peftlab.core.io import save_adapter, load_adapter
from peftlab.core.train import fit
from peftlab.core.testing import assert_close
from peftlab.merge.mixlora import (MixLoraMLP, MeteoraLinear, route_top_k, load_balancing_loss, meteora, model_aux_loss,
                                   MixLoraConfig)
from peftlab.merge.xlora import xlora, PEFT_NAMES, XLoraConfig

IDS = torch.randint(0, 49152, (2, 9), generator=torch.Generator().manual_seed(0))

def _randomise(model, seed=0, std=0.1):
    "Every adapter tensor random (frozen experts too), so that a round trip that dropped one would show."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapters(model).values():
            for k, p in a.named_parameters():
                if not k.startswith("base_layer."): p.copy_(torch.randn(p.shape, generator=g) * std)
        if hasattr(model, "xlora_classifier"):
            for p in model.xlora_classifier.parameters(): p.copy_(torch.randn(p.shape, generator=g) * std)
    return model

def _two_loras(ranks=(2, 4), targets=(("q_proj", "v_proj", "down_proj"),) * 2, names=("math", "code")):
    torch.manual_seed(0)
    m = apply(tiny_llama(), "lora", name=names[0], r=ranks[0], targets=list(targets[0]))
    apply(m, "lora", name=names[1], r=ranks[1], targets=list(targets[1]))
    for a in adapters(m).values(): nn.init.normal_(a.lora_B.weight, std=0.2)
    return m

@pytest.mark.parametrize("n_experts,top_k", [(4, 1), (4, 2), (8, 2), (5, 3)])
def test_load_balancing_loss_is_mixtrals(n_experts, top_k):
    logits = torch.randn(37, n_experts, generator=torch.Generator().manual_seed(n_experts * top_k))
    ours = load_balancing_loss(route_top_k(logits, top_k), n_experts)
    assert_close(ours, load_balancing_loss_func((logits,), n_experts, top_k=top_k), rtol=1e-6, atol=1e-6)

def _meteora():
    return _randomise(meteora(_two_loras(), ["math", "code"], top_k=1), 1)

def _xlora():
    return _randomise(xlora(_two_loras(), ["math", "code"], depth=2, size=16, layerwise_scalings=True, top_k=1), 2)

ROUND_TRIPS = {
    "mixlora": lambda: _randomise(apply(tiny_llama(), "mixlora", n_experts=3, top_k=2, r=2)),
    "mole-token": lambda: _randomise(apply(tiny_llama(), "mole-token", n_experts=4, r=2, attention_targets=[])),
    "meteora": _meteora,
    "xlora": _xlora,
}

@pytest.mark.parametrize("name", list(ROUND_TRIPS))
def test_save_load_round_trip(name, tmp_path):
    model = ROUND_TRIPS[name]()
    save_adapter(model, tmp_path)
    back = load_adapter(tiny_llama(), tmp_path)
    assert_close(back(IDS).logits, model(IDS).logits)
    ours, theirs = dict(model.named_parameters()), dict(back.named_parameters())
    for k in ours:
        if any(s in k for s in ("router", "gate.weight", "xlora_classifier", "lora_")): assert_close(theirs[k], ours[k], msg=k)

@pytest.mark.parametrize("options", [
    dict(),
    dict(depth=2, size=32, classifier_dropout=0.0, layerwise_scalings=True),
    dict(depth=3, size=8, classifier_dropout=0.0, top_k=1, softmax_top_k=True, softmax=False),
    dict(top_k=1, scaling_pass_value=0.5, global_scaling_weight=0.7, temperature=0.5, layerwise_scalings=True),
])
def test_xlora_matches_peft(options, tmp_path):
    "Same LoRA files, PEFT's classifier weights copied into ours: the same logits and scalings (eval mode, no dropout)."
    m, dirs = _two_loras(), {}
    for i, n in enumerate(["math", "code"]): save_adapter(m, tmp_path/str(i), name=n); dirs[str(i)] = str(tmp_path/str(i))
    base = tiny_llama(); base.config.use_cache = False
    cfg = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=64, adapters=dirs, **{PEFT_NAMES[k]: v for k, v in options.items()})
    theirs = peft.get_peft_model(base, cfg).eval()
    ours = tiny_llama()
    for n, path in dirs.items(): load_adapter(ours, path, name=n)
    xlora(ours, list(dirs), **options)
    ours.xlora_classifier.layers.load_state_dict(theirs.base_model.internal_xlora_classifier.layers.state_dict())
    for p in ours.xlora_classifier.parameters(): nn.init.normal_(p, std=0.3)   # sharper scalings than the default init
    theirs.base_model.internal_xlora_classifier.layers.load_state_dict(ours.xlora_classifier.layers.state_dict())
    with torch.no_grad():
        assert_close(ours(IDS).logits, theirs(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)
        assert_close(ours.xlora_scalings, theirs.get_latest_scalings(), rtol=1e-5, atol=1e-5)

def test_fit_trains_routers_with_the_aux_loss():
    "fit's loss is the task loss plus coef · (mean load-balancing loss over layers); the routers move, frozen weights do not."
    model = apply(tiny_llama(), "mixlora", n_experts=4, top_k=2, r=2, aux_loss_coef=1.0)
    routers = {n: a.router.weight.detach().clone() for n, a in adapters(model).items() if isinstance(a, MixLoraMLP)}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    batch = dict(input_ids=IDS, attention_mask=torch.ones_like(IDS), labels=IDS)
    fit(model, [batch], steps=3, lr=1e-2, progress=False)
    model.train(); total = model(**batch).loss; aux = model_aux_loss(model)
    model.eval(); plain = model(**batch).loss
    assert_close(total, plain + aux)
    assert aux.item() >= 2.0 - 1e-4                  # at least top_k: the value at an even load
    for n, w in routers.items(): assert not torch.equal(adapters(model)[n].router.weight, w), n
    for n, p in model.named_parameters():
        if n in frozen: assert torch.equal(p, frozen[n]), n

def test_meteora_trains_gates_only():
    model = meteora(_two_loras(), ["math", "code"], top_k=1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".gate.weight") for n in trainable), sorted(trainable)[:3]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit(model, [dict(input_ids=IDS, attention_mask=torch.ones_like(IDS), labels=IDS)], steps=2, lr=1e-2, progress=False)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable

ERRORS = [  # call, what the message says
    (lambda: apply(tiny_llama(), "mixlora", n_experts=2, top_k=3), "top_k=3 must be between 1 and the number of experts (2)"),
    (lambda: MixLoraConfig(n_experts=1, top_k=1), "a mixture needs at least 2 experts"),
    (lambda: apply(tiny_llama(), "mixlora", n_experts=1), "n_experts=1 of method 'mixlora' must be >= 2"),
    (lambda: apply(tiny_llama(), "mixlora", targets="q_proj"), "is not a gated MLP block"),
    (lambda: apply(tiny_llama(), "mixlora", expert_targets=["q_proj"]), "are not projections of a gated MLP"),
    (lambda: apply(tiny_llama(), "mixlora", attention_targets=["down_proj"]), "lie inside the expert blocks"),
    (lambda: apply(tiny_llama(), "mole-token", top_k=5), "top_k=5 must be between 1 and the number of experts (4)"),
    (lambda: meteora(_two_loras(targets=(("q_proj",), ("q_proj", "v_proj"))), ["math", "code"]), "needs every adapter on the same layers"),
    (lambda: meteora(_two_loras(), ["math"]), "at least 2 adapters"),
    (lambda: meteora(_two_loras(), ["math", "code"], top_k=3), "top_k=3 must be between 1 and the number of adapters (2)"),
    (lambda: meteora(_two_loras(), ["math", "math"]), "adapter names repeat"),
    (lambda: meteora(apply(tiny_llama(), "dora", r=2, targets=["q_proj"]), ["default"]), "embeds LoRA adapters"),
    (lambda: apply(tiny_llama(), "meteora", n_adapters=2, top_k=3), "top_k=3 must be between 1 and the number of adapters (2)"),
    (lambda: xlora(_two_loras(), ["math", "code"], top_k=3), "top_k=3 must be at most the number of adapters (2)"),
    (lambda: XLoraConfig(softmax_top_k=True), "set top_k too"),
    (lambda: xlora(_two_loras(targets=(("q_proj",), ("v_proj",))), ["math", "code"]), "differ at"),
    (lambda: apply(_two_loras(), "xlora", name="x"), "cannot add xlora"),
    (lambda: apply(_two_loras(), "mixlora", name="x"), "cannot add mixlora adapter 'x'"),
]

@pytest.mark.parametrize("call,message", ERRORS, ids=[m for _, m in ERRORS])
def test_errors(call, message):
    with pytest.raises((ValueError, TypeError)) as e: call()
    assert message in str(e.value), str(e.value)

def test_merge_refused_and_model_unchanged():
    from peftlab.core.adapter import merge
    for make in (lambda: _randomise(apply(tiny_llama(), "mixlora", n_experts=2, r=2, attention_targets=[])), _meteora, _xlora):
        model = make()
        out = model(IDS).logits
        with pytest.raises(ValueError, match="cannot be merged into its base weights"): merge(model)
        assert_close(model(IDS).logits, out)

def test_xlora_refuses_a_cache():
    model = _xlora()
    out = model(IDS[:, :5], use_cache=True)   # the model turns the cache off
    assert getattr(out, "past_key_values", None) is None
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    with torch.no_grad(): tiny_llama()(IDS[:, :3], past_key_values=cache, use_cache=True)
    for key in ("past_key_values", "cache"):   # transformers' old and new names
        with pytest.raises(ValueError, match="cannot continue from a key-value cache"): model(IDS[:, 3:5], **{key: cache})
