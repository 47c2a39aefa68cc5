"HiRA, Lily and AdaMSS: PEFT's files load into peftlab and ours into PEFT with the same logits (1e-5), for several seeded random configs; merging keeps HiRA's and AdaMSS's outputs; AdaMSS's clusters are scikit-learn's; PEFT options peftlab lacks are refused by name, with nothing changed."
import json, random
import importlib.util
import numpy as np
import peft, pytest, torch
from peftlab.core.models import tiny_llama
from peftlab.core.registry import apply
from peftlab.core.io import save_adapter, load_adapter
from peftlab.core.adapter import adapters, merge, unmerge
from peftlab.core.testing import assert_close
from peft_roundtrip import perturb as _perturb, inputs, snapshot, assert_unchanged, assert_peft_file_refused, assert_peft_loads_ours, assert_we_load_peft

TARGETS = [["q_proj", "v_proj"], ["k_proj", "down_proj"], "all-linear", ["o_proj", "gate_proj", "up_proj"]]
HIRA_INIT = {"kaiming": True, "gaussian": "gaussian", "random": False}

def hira_case(rng):
    kw = dict(r=rng.choice([1, 2, 4, 8]), targets=rng.choice(TARGETS), dropout=rng.choice([0.0, 0.1]), init=rng.choice(list(HIRA_INIT)))
    return ("hira", kw, lambda: peft.HiraConfig(r=kw["r"], target_modules=kw["targets"], hira_dropout=kw["dropout"], init_weights=HIRA_INIT[kw["init"]]))

def lily_case(rng):
    kw = dict(r=rng.choice([2, 4, 8]), stride_A=rng.choice([1, 2, 3]), num_B=rng.choice([2, 3, 4]), scaling=rng.choice([0.5, 1.0, 2.0]),
              targets=rng.choice(TARGETS + [".*(q|v|up)_proj"]), init=rng.choice(["zeros", "kaiming"]))
    return ("lily", kw, lambda: peft.LilyConfig(r=kw["r"], stride_A=kw["stride_A"], num_B=kw["num_B"], scaling=kw["scaling"],
                                                target_modules=kw["targets"], init_weights=kw["init"] == "zeros"))

def adamss_case(rng):
    # R stays below every target's d_out (32): at R = d_out the rows of U are orthonormal and the clusters are rounding's choice
    kw = dict(r=rng.choice([4, 8, 16]), num_subspaces=rng.choice([2, 3, 5]), subspace_rank=rng.choice([1, 2, 3]),
              use_dynamic_rank=rng.choice([False, True]), svd_threshold=rng.choice([0.1, 0.3]), random_seed=rng.choice([0, 7]),
              init=rng.choice(["zeros", "random"]), targets=rng.choice(TARGETS))
    return ("adamss", kw, lambda: peft.AdamssConfig(r=kw["r"], num_subspaces=kw["num_subspaces"], subspace_rank=kw["subspace_rank"],
                                                    use_dynamic_rank=kw["use_dynamic_rank"], svd_threshold=kw["svd_threshold"],
                                                    random_seed=kw["random_seed"], target_modules=kw["targets"],
                                                    init_weights="orthogonal" if kw["init"] == "zeros" else None))

def needs_sklearn(case):
    "PEFT's AdaMSS cannot be built without scikit-learn."
    return pytest.param(*case, marks=[SKIP_NO_SKLEARN] if case[0] == "adamss" else [])

def seeded_cases(make, n, seed):
    rng = random.Random(seed)
    return [make(rng) for _ in range(n)]

HAVE_SKLEARN = importlib.util.find_spec("sklearn") is not None
SKIP_NO_SKLEARN = pytest.mark.skipif(not HAVE_SKLEARN, reason="PEFT's AdaMSS needs scikit-learn")
# seeds picked so that the few cases cover every init, all-linear, a regex (Lily) and dynamic ranks (AdaMSS)
CASES = (seeded_cases(hira_case, 2, seed=9) + seeded_cases(lily_case, 2, seed=6) + seeded_cases(lily_case, 1, seed=5)
         + seeded_cases(adamss_case, 2, seed=9))
IDS = [f"{c[0]}-{i}" for i, c in enumerate(CASES)]
MERGEABLE = [c for c in CASES if c[0] != "lily"]
CASES = [needs_sklearn(c) for c in CASES]

def perturb(model, seed=0): return _perturb(model, seed).eval()   # dropout off: the outputs are comparable

@pytest.mark.parametrize("name,kw,peft_cfg", CASES, ids=IDS)
def test_peft_loads_ours(name, kw, peft_cfg, tmp_path):
    assert_peft_loads_ours(tiny_llama, name, kw, tmp_path)

@pytest.mark.parametrize("name,kw,peft_cfg", CASES, ids=IDS)
def test_we_load_peft(name, kw, peft_cfg, tmp_path):
    assert_we_load_peft(tiny_llama, name, peft_cfg(), tmp_path, back=False)

@pytest.mark.parametrize("name,kw,peft_cfg", MERGEABLE, ids=[f"{c[0]}-{i}" for i, c in enumerate(MERGEABLE)])
def test_merge_equals_unmerged(name, kw, peft_cfg):
    m = perturb(apply(tiny_llama(), name, **kw))
    out = m(**inputs()).logits
    weights = {n: a.base_layer.weight.detach().clone() for n, a in adapters(m).items()}
    merge(m); assert_close(m(**inputs()).logits, out, rtol=1e-4, atol=1e-4)  # float32 sums in another order
    unmerge(m)
    for n, a in adapters(m).items(): assert_close(a.base_layer.weight, weights[n], rtol=1e-5, atol=1e-6)
    assert_close(m(**inputs()).logits, out, rtol=1e-4, atol=1e-4)

def test_hira_rank_pattern_saves_in_peftlab_format(tmp_path):
    "PEFT 0.21 builds every HiRA layer at rank r, whatever rank_pattern says: ours keeps its pattern in peftlab's format."
    ours = perturb(apply(tiny_llama(), "hira", r=4, rank_pattern={"v_proj": 2}, targets=["q_proj", "v_proj"]))
    save_adapter(ours, tmp_path)
    assert json.loads((tmp_path/"adapter_config.json").read_text())["peftlab_method"] == "hira"
    back = load_adapter(tiny_llama(), tmp_path).eval()
    assert adapters(back)["model.layers.0.self_attn.v_proj"].r == 2
    assert_close(back(**inputs()).logits, ours(**inputs()).logits)

def test_lily_cannot_merge_and_shares_once():
    m = apply(tiny_llama(), "lily", r=4, stride_A=2, num_B=3)
    a = adapters(m)
    assert a["model.layers.0.self_attn.q_proj"].lily_A is a["model.layers.1.self_attn.q_proj"].lily_A
    with pytest.raises(TypeError, match="no fixed ΔW to merge"): merge(m)

def test_conv_targets_are_refused():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 4))
    for method in ("hira", "lily", "adamss"):
        with pytest.raises(TypeError, match=f"{method} cannot wrap 0 \\(Conv2d\\)"): apply(net, method, targets=["0"], r=2)

# (a PEFT config with an option peftlab does not support, the option's name in the error)
REFUSED = [
    (lambda: peft.HiraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[0]), "layers_to_transform=[0]"),
    (lambda: peft.HiraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save=['lm_head']"),
    (lambda: peft.LilyConfig(r=4, target_modules=["q_proj"], layers_to_transform=[1]), "layers_to_transform=[1]"),
    (lambda: peft.LilyConfig(r=4, target_modules=["q_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"]), "exclude_modules="),
    pytest.param(lambda: peft.AdamssConfig(r=4, num_subspaces=2, target_modules=["q_proj"], layers_to_transform=[1]), "layers_to_transform=[1]",
                 marks=SKIP_NO_SKLEARN, id="adamss layers_to_transform=[1]"),
]

@pytest.mark.parametrize("peft_cfg,option", REFUSED)
def test_unsupported_peft_option_is_refused(peft_cfg, option, tmp_path):
    assert_peft_file_refused(tiny_llama, peft_cfg(), option, tmp_path)

def test_hira_embedding_file_is_refused(tmp_path):
    "PEFT's HiRA also wraps embeddings; peftlab's wraps linear layers only, and says so before changing anything."
    peft.get_peft_model(tiny_llama(), peft.HiraConfig(r=2, target_modules=["embed_tokens"])).save_pretrained(tmp_path)
    base = tiny_llama()
    before = snapshot(base)
    with pytest.raises(TypeError, match="hira cannot wrap model.embed_tokens \\(Embedding\\)"): load_adapter(base, tmp_path)
    assert_unchanged(base, before)

@SKIP_NO_SKLEARN
def test_adamss_clusters_are_sklearns():
    "The k-means peftlab runs in NumPy labels every output channel as scikit-learn's does, on every tiny-llama layer and random data."
    from sklearn.cluster import KMeans
    from peftlab.adapters.adamss import kmeans_labels, top_singular
    sk = lambda X, k: KMeans(n_clusters=k, init="random", n_init=1, max_iter=10, random_state=123456789).fit_predict(X)
    layers = [m.weight.detach() for n, m in tiny_llama(seed=1).model.layers[0].named_modules() if isinstance(m, torch.nn.Linear)]
    rows = [top_singular(W, r)[0].numpy() for W in layers for r in (4, 16)]
    g = torch.Generator().manual_seed(0)
    rows += [torch.randn(n, 6, generator=g).numpy() for n in (5, 17, 40, 77)]
    for X in rows:
        for k in (2, 5):
            assert np.array_equal(kmeans_labels(X, k), sk(X, k))
