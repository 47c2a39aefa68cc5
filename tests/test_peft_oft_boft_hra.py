"The orthogonal family -- OFT, BOFT, HRA -- against PEFT: files both ways with the same outputs, merging, and refused options."
import random, re, tempfile
import peft, pytest, torch
from peftlab.core.models import tiny_llama
from peftlab.core.registry import apply, METHODS, discover
from peftlab.core.io import save_adapter, load_adapter
from peftlab.core.adapter import adapters, merge, unmerge
from peftlab.core.testing import assert_close
from peft_roundtrip import perturb, inputs

discover()

class BlockDiag:   # stands in for PEFT's compiled fbd_cuda, without which PEFT builds one butterfly factor whatever its config says
    forward = staticmethod(lambda t: [torch.stack([torch.block_diag(*f) for f in t])])

@pytest.fixture(autouse=True)
def peft_butterfly(monkeypatch):
    import peft.tuners.boft.layer as boft_layer
    monkeypatch.setattr(boft_layer, "_FBD_CUDA", BlockDiag)
TARGETS = [["q_proj", "v_proj"], ["k_proj", "down_proj"], "all-linear", ["o_proj", "up_proj", "gate_proj"]]

def oft_case(rng):
    "Random OFT options, ours and PEFT's."
    by_r, size = rng.random() < 0.3, rng.choice([4, 8, 16, 32])
    neumann, coft, share = rng.random() < 0.5, rng.random() < 0.3, rng.random() < 0.3
    ours = dict(targets=rng.choice(TARGETS), use_cayley_neumann=neumann, num_cayley_neumann_terms=rng.choice([4, 5, 7]),
                coft=coft, eps=rng.choice([0.05, 0.5]), block_share=share, **(dict(r=64 // size) if by_r else dict(block_size=size)))
    theirs = dict(target_modules=ours["targets"], use_cayley_neumann=neumann, num_cayley_neumann_terms=ours["num_cayley_neumann_terms"],
                  coft=coft, eps=ours["eps"], block_share=share, r=ours.get("r", 0), oft_block_size=ours.get("block_size", 0))
    return "oft", ours, lambda: peft.OFTConfig(**theirs)

def hra_case(rng):
    r, gs = rng.choice([2, 4, 8]), rng.random() < 0.5
    t = rng.choice(TARGETS)
    return "hra", dict(r=r, gram_schmidt=gs, targets=t), lambda: peft.HRAConfig(r=r, apply_GS=gs, target_modules=t)

def boft_case(rng):
    size, factor = rng.choice([2, 4, 8]), rng.choice([1, 2, 3])
    t = rng.choice(TARGETS)
    return "boft", dict(block_size=size, n_butterfly_factor=factor, targets=t), \
        lambda: peft.BOFTConfig(boft_block_size=size, boft_n_butterfly_factor=factor, target_modules=t)

CASES = [
    ("oft", dict(block_size=16), lambda: peft.OFTConfig(oft_block_size=16, use_cayley_neumann=False, target_modules="all-linear")),
    ("oft", dict(r=8, use_cayley_neumann=True, targets=["q_proj", "down_proj"]),
     lambda: peft.OFTConfig(r=8, oft_block_size=0, use_cayley_neumann=True, target_modules=["q_proj", "down_proj"])),
    ("hra", dict(r=8), lambda: peft.HRAConfig(r=8, target_modules="all-linear")),
    *[make(random.Random(seed)) for seed in range(3) for make in (oft_case, hra_case)],
]
if "boft" in METHODS: CASES += [("boft", dict(block_size=4, n_butterfly_factor=2), lambda: peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules="all-linear")),
                                *[boft_case(random.Random(seed)) for seed in range(3)]]
IDS = [f"{c[0]}-{i}" for i, c in enumerate(CASES)]

@pytest.mark.parametrize("name,kw,peft_cfg", CASES, ids=IDS)
def test_peft_loads_ours(name, kw, peft_cfg):
    ours = perturb(apply(tiny_llama(), name, **kw)).eval()
    d = tempfile.mkdtemp(); save_adapter(ours, d)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), d)
    assert_close(theirs(**inputs()).logits, ours(**inputs()).logits)
    back = load_adapter(tiny_llama(), d)   # and our own files back, through the same layout
    assert_close(back(**inputs()).logits, ours(**inputs()).logits)

@pytest.mark.parametrize("name,kw,peft_cfg", CASES, ids=IDS)
def test_we_load_peft(name, kw, peft_cfg):
    torch.manual_seed(0)
    theirs = perturb(peft.get_peft_model(tiny_llama(), peft_cfg())).eval()
    d = tempfile.mkdtemp(); theirs.save_pretrained(d)
    ours = load_adapter(tiny_llama(), d)
    assert ours.peftlab_method[0] == name
    assert_close(ours(**inputs()).logits, theirs(**inputs()).logits)

@pytest.mark.parametrize("name,kw,peft_cfg", CASES, ids=IDS)
def test_merge_equals_unmerged(name, kw, peft_cfg):
    m = perturb(apply(tiny_llama(), name, **kw)).eval()
    out = m(**inputs()).logits
    weights = {n: a.base_layer.weight.detach().clone() for n, a in adapters(m).items()}
    merge(m); assert_close(m(**inputs()).logits, out, rtol=1e-4, atol=1e-4)  # float32 products in another order
    unmerge(m)
    for n, a in adapters(m).items(): assert_close(a.base_layer.weight, weights[n], rtol=1e-5, atol=1e-5)
    assert_close(m(**inputs()).logits, out, rtol=1e-4, atol=1e-4)

UNSUPPORTED = [
    ("oft", lambda: peft.OFTConfig(oft_block_size=16, target_modules=["q_proj"], layers_to_transform=[0]), "layers_to_transform=[0]"),
    ("oft", lambda: peft.OFTConfig(oft_block_size=16, target_modules=["q_proj"], use_cayley_neumann=True, num_cayley_neumann_terms=3),
     "num_cayley_neumann_terms=3"),
    ("hra", lambda: peft.HRAConfig(r=3, target_modules=["q_proj"]), "r=3"),
    ("hra", lambda: peft.HRAConfig(r=4, target_modules=["q_proj"], exclude_modules=["layers.0.self_attn.q_proj"]), "exclude_modules"),
]
if "boft" in METHODS: UNSUPPORTED += [("boft", lambda: peft.BOFTConfig(boft_block_size=4, target_modules=["q_proj"], layers_to_transform=[1]), "layers_to_transform=[1]")]

@pytest.mark.parametrize("name,peft_cfg,option", UNSUPPORTED, ids=[f"{u[0]}-{u[2]}" for u in UNSUPPORTED])
def test_unsupported_option_is_refused_and_changes_nothing(name, peft_cfg, option):
    theirs = peft.get_peft_model(tiny_llama(), peft_cfg())
    d = tempfile.mkdtemp(); theirs.save_pretrained(d)
    base = tiny_llama(); before = {k: v.clone() for k, v in base.state_dict().items()}
    grads = [p.requires_grad for p in base.parameters()]
    with pytest.raises(ValueError, match=rf"option {re.escape(option)}.*written by PEFT {re.escape(peft.__version__)}"): load_adapter(base, d)
    assert adapters(base) == {} and [p.requires_grad for p in base.parameters()] == grads
    assert base.state_dict().keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in base.state_dict().items())

def test_convolutions_are_refused():
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 4))
    for name, kw in [("oft", dict(block_size=3)), ("hra", dict(r=2))] + ([("boft", dict(block_size=3))] if "boft" in METHODS else []):
        with pytest.raises(TypeError, match=r"cannot wrap 0 \(Conv2d\)"): apply(conv, name, targets=["0"], **kw)

def test_boft_file_from_peft_without_its_extension_is_refused(monkeypatch):
    "PEFT without fbd_cuda writes boft_n_butterfly_factor=2 but one factor's tensors: refused, saying why, nothing changed."
    import peft.tuners.boft.layer as boft_layer
    monkeypatch.setattr(boft_layer, "_FBD_CUDA", None); monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: None)
    theirs = peft.get_peft_model(tiny_llama(), peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj"]))
    d = tempfile.mkdtemp(); theirs.save_pretrained(d)
    base = tiny_llama(); before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match="without its CUDA extension"): load_adapter(base, d)
    assert adapters(base) == {} and all(torch.equal(v, before[k]) for k, v in base.state_dict().items())

def test_training_dropout_sets_blocks_to_identity():
    for name, kw, attr in [("oft", dict(block_size=8, module_dropout=0.5), "oft_R"), ("boft", dict(block_size=8, dropout=0.5), "boft_R")]:
        m = perturb(apply(tiny_llama(), name, targets=["q_proj"], **kw)).train()
        a = next(iter(adapters(m).values()))
        x = torch.randn(2, 64)
        torch.manual_seed(0); y_train = a(x)
        m.eval(); y_eval = a(x)
        assert not torch.allclose(y_train, y_eval), name   # half the blocks were the identity in training
        assert_close(a(x), y_eval)
