"PVeRA, UniLoRA and TinyLoRA: PEFT's files load into peftlab and ours into PEFT with the same logits (1e-5), for several seeded random configs; merging keeps the outputs; PEFT options peftlab lacks are refused by name, with nothing changed."
import random, warnings
import peft, pytest, torch
from peftlab.core.models import tiny_llama
from peftlab.core.registry import apply
from peftlab.core.adapter import adapters, merge, unmerge
from peftlab.core.testing import assert_close
from peft_roundtrip import perturb as _perturb, inputs, assert_peft_file_refused, assert_peft_loads_ours, assert_we_load_peft

TARGETS = [["q_proj", "v_proj"], ["k_proj", "down_proj"], "all-linear", ["o_proj", "gate_proj", "up_proj"]]

def pvera_case(rng):
    kw = dict(r=rng.choice([2, 8, 32]), targets=rng.choice(TARGETS), projection_prng_key=rng.randrange(100),
              save_projection=rng.random() < 0.5, d_initial=rng.choice([0.1, 0.05, 1.0]), dropout=rng.choice([0.0, 0.1]),
              sample_at_inference=rng.random() < 0.3, generator_seed=rng.choice([None, 7]))
    if kw["sample_at_inference"]: kw["generator_seed"] = 7   # sampled outputs compare only with seeded noise
    return ("pvera", kw, lambda: peft.PveraConfig(r=kw["r"], target_modules=kw["targets"], projection_prng_key=kw["projection_prng_key"],
                                                  save_projection=kw["save_projection"], d_initial=kw["d_initial"], pvera_dropout=kw["dropout"],
                                                  sample_at_inference=kw["sample_at_inference"], generator_seed=kw["generator_seed"]))

def unilora_case(rng):
    kw = dict(r=rng.choice([1, 2, 4]), theta_d_length=rng.choice([16, 100, 256]), proj_seed=rng.randrange(100), targets=rng.choice(TARGETS),
              init=rng.choice(["uniform", "normal"]), dropout=rng.choice([0.0, 0.1]), save_indices=rng.random() < 0.5)
    return ("unilora", kw, lambda: peft.UniLoraConfig(r=kw["r"], theta_d_length=kw["theta_d_length"], proj_seed=kw["proj_seed"], target_modules=kw["targets"],
                                                      init_weights=kw["init"] == "uniform", unilora_dropout=kw["dropout"], save_indices=kw["save_indices"]))

def tinylora_case(rng):
    kw = dict(r=rng.choice([1, 2, 4]), u=rng.choice([1, 3, 13]), weight_tying=rng.choice([0.0, 0.3, 0.5, 1.0]), projection_seed=rng.randrange(100),
              save_projection=rng.random() < 0.5, init=rng.choice(["zeros", "uniform"]), svd_split=rng.choice(["paper", "sqrt"]),
              targets=rng.choice(TARGETS), dropout=rng.choice([0.0, 0.1]))
    return ("tinylora", kw, lambda: peft.TinyLoraConfig(r=kw["r"], u=kw["u"], weight_tying=kw["weight_tying"], projection_seed=kw["projection_seed"],
                                                        save_projection=kw["save_projection"], init_weights=True if kw["init"] == "zeros" else "uniform",
                                                        target_modules=kw["targets"], tinylora_dropout=kw["dropout"]))

def seeded_cases(make, n, seed):
    rng = random.Random(seed)
    return [make(rng) for _ in range(n)]

CASES = seeded_cases(pvera_case, 2, seed=0) + seeded_cases(unilora_case, 2, seed=0) + seeded_cases(tinylora_case, 2, seed=0)
IDS = [f"{c[0]}-{i}" for i, c in enumerate(CASES)]

def perturb(model, seed=0): return _perturb(model, seed).eval()   # dropout off: the outputs are comparable

@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # PEFT warns when projections are regenerated from a seed
        yield

@pytest.mark.parametrize("name,kw,peft_cfg", CASES, ids=IDS)
def test_peft_loads_ours(name, kw, peft_cfg, tmp_path):
    assert_peft_loads_ours(tiny_llama, name, kw, tmp_path)

@pytest.mark.parametrize("name,kw,peft_cfg", CASES, ids=IDS)
def test_we_load_peft(name, kw, peft_cfg, tmp_path):
    assert_we_load_peft(tiny_llama, name, peft_cfg(), tmp_path)   # PVeRA sampling at inference: each side's seeded generator draws first

@pytest.mark.parametrize("name,kw,peft_cfg", CASES, ids=IDS)
def test_merge_equals_unmerged(name, kw, peft_cfg):
    m = perturb(apply(tiny_llama(), name, **{**kw, "sample_at_inference": False} if name == "pvera" else kw))
    out = m(**inputs()).logits
    weights = {n: a.base_layer.weight.detach().clone() for n, a in adapters(m).items()}
    merge(m); assert_close(m(**inputs()).logits, out, rtol=1e-4, atol=1e-4)  # float32 sums in another order
    unmerge(m)
    for n, a in adapters(m).items(): assert_close(a.base_layer.weight, weights[n], rtol=1e-5, atol=1e-6)
    assert_close(m(**inputs()).logits, out, rtol=1e-4, atol=1e-4)

def test_tinylora_paper_split_differs_from_peft_split():
    "The same start and rank-r approximation, but B R A is another function of v unless the top singular values are equal."
    from peftlab.adapters.unilora_tinylora import TinyLoraLinear, tinylora_projection
    base = torch.nn.Linear(4, 4, bias=False)
    with torch.no_grad(): base.weight.copy_(torch.diag(torch.tensor([3.0, 1.0, 0.5, 0.1])))
    v, P = torch.nn.Parameter(torch.ones(3)), tinylora_projection(3, 2, 0)
    paper, sqrt = (TinyLoraLinear(base, v, 0, P, 2, split) for split in ("paper", "sqrt"))
    assert_close(paper.tinylora_B @ paper.tinylora_A, sqrt.tinylora_B @ sqrt.tinylora_A)
    assert (paper.delta_weight() - sqrt.delta_weight()).norm() > 0.1 * paper.delta_weight().norm()

@pytest.mark.parametrize("D,d,seed", [(1000, 64, 42), (4096, 256, 0), (10, 7, 3), (5, 16, 1)])
def test_unilora_indices_are_peft_s(D, d, seed):
    from peft.tuners.unilora.model import UniLoraModel
    from peftlab.adapters.unilora_tinylora import balanced_indices
    assert torch.equal(balanced_indices(D, d, seed), UniLoraModel.generate_index(D, d, seed))

def test_shared_vectors_train_once():
    m = apply(tiny_llama(), "unilora", r=2, theta_d_length=32)
    assert len({id(a.unilora_theta_d) for a in adapters(m).values()}) == 1
    m(**inputs()).logits.sum().backward()
    assert next(iter(adapters(m).values())).unilora_theta_d.grad.abs().sum() > 0
    t = apply(tiny_llama(), "tinylora", u=5, weight_tying=0.5)     # 14 targets in 7 groups of 2
    assert len({id(a.tinylora_v) for a in adapters(t).values()}) == 7 and sum(p.numel() for p in t.parameters() if p.requires_grad) == 35

def test_pvera_samples_only_while_training():
    m = apply(tiny_llama(), "pvera", r=4, targets=["q_proj"])
    with torch.no_grad():
        for a in adapters(m).values(): a.pvera_lambda_b.fill_(1.0)
    ev = m.eval()(**inputs()).logits
    assert torch.equal(ev, m(**inputs()).logits)                       # eval: the mean, deterministic
    assert not torch.allclose(m.train()(**inputs()).logits, ev)       # training: sampled

# (a PEFT config with an option peftlab does not support, the option's name in the error)
REFUSED = [
    (lambda: peft.PveraConfig(r=8, target_modules=["q_proj"], layers_to_transform=[0]), "layers_to_transform=[0]"),
    (lambda: peft.PveraConfig(r=8, target_modules=["q_proj"], bias="pvera_only"), "bias='pvera_only'"),
    (lambda: peft.UniLoraConfig(r=2, theta_d_length=16, target_modules=["q_proj"], layers_to_transform=[1]), "layers_to_transform=[1]"),
    (lambda: peft.TinyLoraConfig(u=3, target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save=['lm_head']"),
]

@pytest.mark.parametrize("peft_cfg,option", REFUSED, ids=[o for _, o in REFUSED])
def test_unsupported_peft_option_is_refused(peft_cfg, option, tmp_path):
    assert_peft_file_refused(tiny_llama, peft_cfg(), option, tmp_path)
