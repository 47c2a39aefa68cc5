"MonteCLoRA: PEFT's files load into peftlab and ours into PEFT with the same logits (1e-5), for several seeded random configs; PEFT's training forward, variational loss and gradients are reproduced from the same draws; merging keeps the outputs; PEFT options peftlab lacks are refused by name, with nothing changed."
import json, random
import peft, pytest, torch
from peftlab.core.models import tiny_llama
from peftlab.core.registry import apply
from peftlab.core.io import save_adapter, load_adapter
from peftlab.core.adapter import adapters, merge, unmerge
from peftlab.core.testing import assert_close
from peftlab.adapters.velora_monteclora import monteclora_loss
from peft_roundtrip import perturb as _perturb, inputs, assert_peft_file_refused

def base(): return tiny_llama(vocab_size=1024)   # the ids of `inputs()` are below 1000; a small vocabulary builds fast
def perturb(model, seed=0): return _perturb(model, seed).eval()

TARGETS = [["q_proj", "v_proj"], ["k_proj", "down_proj"], "all-linear", ["o_proj", "up_proj"]]

def monteclora_case(rng):
    kw = dict(r=rng.choice([2, 4, 8]), alpha=rng.choice([4.0, 16.0]), rslora=rng.choice([False, True]), targets=rng.choice(TARGETS),
              num_samples=rng.choice([1, 3, 8]), use_entropy=rng.choice([False, True]), dirichlet_prior=rng.choice([0.1, 1.0]),
              sample_scaler=rng.choice([1e-4, 0.05]), kl_loss_weight=rng.choice([1e-5, 1e-2]), buffer_size=rng.choice([2, 5]))
    mc = {k: kw[k] for k in ("num_samples", "use_entropy", "dirichlet_prior", "sample_scaler", "kl_loss_weight", "buffer_size")}
    return kw, lambda: peft.LoraConfig(r=kw["r"], lora_alpha=kw["alpha"], use_rslora=kw["rslora"], target_modules=kw["targets"],
                                       monteclora_config=peft.MontecloraConfig(**mc))

_rng = random.Random(0)
MONTECLORA = [monteclora_case(_rng) for _ in range(3)]
MC_IDS = [f"monteclora-{i}-N{kw['num_samples']}-r{kw['r']}" for i, (kw, _) in enumerate(MONTECLORA)]

@pytest.mark.parametrize("kw,peft_cfg", MONTECLORA, ids=MC_IDS)
def test_monteclora_peft_loads_ours(kw, peft_cfg, tmp_path):
    ours = perturb(apply(base(), "monteclora", **kw))
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(base(), tmp_path).eval()
    assert theirs.peft_config["default"].monteclora_config.num_samples == kw["num_samples"]
    assert_close(theirs(**inputs()).logits, ours(**inputs()).logits)

def _peft_layers(peft_model)->dict:
    "PEFT's MonteCLoRA layers by our module names."
    return {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if hasattr(m, "lora_monteclora_sampler")}

def _peek(buffered):
    "The draws PEFT's buffered sampler hands out next, without taking them (refilled first when used up, as `get` does)."
    if buffered.index >= buffered.buffer_size: buffered._refill_buffer()
    return buffered.buffer[buffered.index]

def _take_peft_draws(ours, theirs):
    "Make each of our samplers draw what PEFT's sampler of the same layer takes next (run ours first)."
    for n, layer in _peft_layers(theirs).items():
        buffered = layer.lora_monteclora_sampler["default"].sampler
        adapters(ours)[n].lora_monteclora_sampler.draw = lambda b=buffered: _peek(b)

@pytest.mark.parametrize("kw,peft_cfg", MONTECLORA, ids=MC_IDS)
def test_monteclora_we_load_peft_and_train_as_it_does(kw, peft_cfg, tmp_path):
    torch.manual_seed(0)
    theirs = perturb(peft.get_peft_model(base(), peft_cfg()))
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(base(), tmp_path).eval()
    assert ours.peftlab_method[0] == "monteclora" and ours.peftlab_method[1].dirichlet_kl == "peft"
    assert_close(ours(**inputs()).logits, theirs(**inputs()).logits)
    save_adapter(ours, tmp_path/"back")           # and PEFT reads our copy back: the same outputs again
    again = peft.PeftModel.from_pretrained(base(), tmp_path/"back").eval()
    assert_close(again(**inputs()).logits, theirs(**inputs()).logits)
    # training forwards: the same draws give the same logits, variational loss and gradients, over more forwards than PEFT's buffer holds
    ours.train(); theirs.train(); _take_peft_draws(ours, theirs)
    for _ in range(kw["buffer_size"] + 1):
        batch = dict(inputs(), labels=inputs()["input_ids"])
        mine, peft_out = ours(**batch), theirs(**batch)
        assert_close(mine.logits, peft_out.logits)
        assert_close(monteclora_loss(ours), theirs.base_model._get_monteclora_loss())
        assert_close(mine.loss, peft_out.loss + theirs.base_model._get_monteclora_loss())
    mine.loss.backward(); (peft_out.loss + theirs.base_model._get_monteclora_loss()).backward()
    grads = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for n, p in ours.named_parameters():
        if p.requires_grad: assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)   # float32 sums in another order

def test_monteclora_exact_kl_differs_from_peft_only_in_the_dirichlet_term(tmp_path):
    kw, peft_cfg = MONTECLORA[0]
    torch.manual_seed(0)
    theirs = perturb(peft.get_peft_model(base(), peft_cfg()))
    theirs.save_pretrained(tmp_path)
    exact = apply(base(), "monteclora", **dict(kw, dirichlet_kl="exact"))
    exact.load_state_dict(load_adapter(base(), tmp_path).state_dict())
    s = next(iter(adapters(exact).values())).lora_monteclora_sampler
    from peftlab.adapters.velora_monteclora import dirichlet_kl
    a = s.expert_weights_prior.exp()
    D = torch.distributions
    assert_close(dirichlet_kl(a, s.prior), D.kl_divergence(D.Dirichlet(a), D.Dirichlet(torch.full_like(a, s.prior))), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(dirichlet_kl(a, s.prior), dirichlet_kl(a, s.prior, "peft"))

def test_monteclora_merge_equals_unmerged():
    m = perturb(apply(base(), "monteclora", r=4, num_samples=3, targets="all-linear"))
    out = m(**inputs()).logits
    merge(m); assert_close(m(**inputs()).logits, out, rtol=1e-4, atol=1e-4)   # float32 sums in another order
    unmerge(m); assert_close(m(**inputs()).logits, out, rtol=1e-4, atol=1e-4)

def test_monteclora_with_an_objective_gets_its_term_from_monteclora_loss():
    m = apply(base(), "monteclora", r=2, num_samples=2, kl_loss_weight=1.0, targets=["q_proj"]).train()
    logits = m(inputs()["input_ids"]).logits                                    # no labels: no loss to add it to
    assert torch.is_tensor(monteclora_loss(m)) and monteclora_loss(m) > 0
    m.eval(); m(inputs()["input_ids"])
    assert monteclora_loss(m) == 0.0                                            # evaluation: no variational term

# (a PEFT config with an option peftlab does not support, the option's name in the error)
REFUSED = [
    (lambda: peft.LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[0], monteclora_config=peft.MontecloraConfig(num_samples=2, buffer_size=1)), "layers_to_transform=[0]"),
    (lambda: peft.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True, monteclora_config=peft.MontecloraConfig(num_samples=2, buffer_size=1)), "lora_bias=True"),
]

@pytest.mark.parametrize("peft_cfg,option", REFUSED, ids=[o for _, o in REFUSED])
def test_unsupported_peft_option_is_refused(peft_cfg, option, tmp_path):
    assert_peft_file_refused(base, peft_cfg(), option, tmp_path)

# ---- Arrow: PEFT's create_arrow_model over the same experts gives the same logits
from peft.tuners.lora.arrow import create_arrow_model
from peft.tuners.lora.config import ArrowConfig as PeftArrowConfig

def arrow_case(rng):
    lora = dict(r=rng.choice([2, 4]), lora_alpha=rng.choice([4.0, 16.0]), use_rslora=rng.choice([False, True]),
                target_modules=rng.choice([["q_proj", "v_proj"], ["k_proj", "down_proj"], ["o_proj", "up_proj"]]))
    return dict(lora=lora, n_experts=rng.choice([2, 3, 4]), n_general=rng.choice([0, 0, 1, 2]), top_k=rng.choice([1, 2]),
                temperature=rng.choice([1.0, 0.3]), seed=rng.choice([0, 7]))

_arng = random.Random(1)
ARROW = [arrow_case(_arng) for _ in range(3)]

def _peft_lora_library(case, tmp_path)->tuple[list,list]:
    "Random PEFT LoRA experts and general adapters saved under `tmp_path`."
    dirs = []
    for i in range(case["n_experts"] + case["n_general"]):
        torch.manual_seed(100 + i)
        m = perturb(peft.get_peft_model(base(), peft.LoraConfig(**case["lora"])), seed=i)
        m.save_pretrained(tmp_path/f"lora{i}"); dirs.append(str(tmp_path/f"lora{i}"))
    return dirs[:case["n_experts"]], dirs[case["n_experts"]:]

@pytest.mark.parametrize("case", ARROW, ids=[f"arrow-{i}-E{c['n_experts']}-G{c['n_general']}-k{c['top_k']}" for i, c in enumerate(ARROW)])
def test_arrow_matches_peft(case, tmp_path):
    experts, general = _peft_lora_library(case, tmp_path)
    cfg = PeftArrowConfig(top_k=case["top_k"], router_temperature=case["temperature"], use_gks=bool(general), rng_seed=case["seed"])
    theirs = create_arrow_model(base(), experts, cfg, general_adapter_paths=general or None).eval()
    ours = apply(base(), "arrow", experts=experts, general=general, top_k=case["top_k"], router_temperature=case["temperature"],
                 prototypes="power", rng_seed=case["seed"]).eval()
    assert_close(ours(**inputs()).logits, theirs(**inputs()).logits)

def test_arrow_svd_prototypes_are_peft_converged_ones(tmp_path):
    case = dict(ARROW[0], n_general=0)
    experts, _ = _peft_lora_library(case, tmp_path)
    svd = apply(base(), "arrow", experts=experts, top_k=1)
    power = apply(base(), "arrow", experts=experts, top_k=1, prototypes="power", rng_seed=0)
    for n, a in adapters(svd).items():
        cos = (a.arrow_prototypes * adapters(power)[n].arrow_prototypes).sum(1).abs()
        assert (cos > 0.99).all(), (n, cos)   # 15 power iterations: near the singular vector, not on it

def test_peft_arrow_router_file_is_refused_with_the_way_to_build_it(tmp_path):
    experts, _ = _peft_lora_library(dict(ARROW[0], n_general=0), tmp_path)
    theirs = create_arrow_model(base(), experts, PeftArrowConfig(top_k=1))
    theirs.save_pretrained(tmp_path/"router", selected_adapters=["arrow_router"])
    model = base()
    with pytest.raises(ValueError, match="arrow_config.*experts="): load_adapter(model, next((tmp_path/"router").rglob("adapter_config.json")).parent)
    assert not adapters(model)
