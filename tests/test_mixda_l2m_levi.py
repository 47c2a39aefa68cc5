"MixDA, L2M and LEVI (peftlab.merge.mixda_l2m_levi): save/load round trips, routing shapes, the L2M key loss's gradient, the base left untouched, bad input."
import pytest, torch
from torch import nn
from peftlab.core.models import tiny_llama
from peftlab.core.registry import apply, methods
from peftlab.core.io import save_adapter, load_adapter
from peftlab.merge.mixda_l2m_levi import L2mKeys, MixdaMLP, L2mLinear, LeviHead, train_domain_adapter, train_mixda_task

IDS = torch.randint(0, 1000, (3, 6), generator=torch.Generator().manual_seed(0))
METHODS = [("mixda", dict(n_domains=2, r=4, task_r=2)), ("l2m", dict(pool_size=3, top_k=2, r=2)),
           ("levi", dict(layers=[0, 1], small_width=8, small_heads=2, r=4))]

def randomised(name, options):
    "The method applied with every trainable tensor random, so outputs depend on all of them."
    torch.manual_seed(0)
    m = apply(tiny_llama(), name, **options)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad: p.normal_(std=0.1)
    return m.eval()

@pytest.mark.parametrize("name,options", METHODS)
def test_save_load_same_forward(name, options, tmp_path):
    m = randomised(name, options)
    y = m(IDS).logits
    save_adapter(m, tmp_path)
    torch.testing.assert_close(load_adapter(tiny_llama(), tmp_path).eval()(IDS).logits, y, rtol=0, atol=0)

@pytest.mark.parametrize("name,options", METHODS)
def test_base_untouched(name, options):
    "Training moves only the method's tensors: every base weight keeps its value, and with nothing trained the model is its base."
    base = tiny_llama().state_dict()
    m = apply(tiny_llama(), name, **options)
    torch.testing.assert_close(m(IDS).logits, tiny_llama()(IDS).logits)
    from peftlab.core.train import fit
    fit(m, [dict(input_ids=IDS, attention_mask=torch.ones_like(IDS), labels=IDS)], steps=2, lr=1e-2, progress=False)
    own = {k.replace(".base_layer", ""): v for k, v in m.state_dict().items()}
    for k, v in base.items(): assert torch.equal(own[k], v), k

@pytest.mark.parametrize("name,kind", [("mixda", MixdaMLP), ("l2m", L2mLinear), ("levi", LeviHead)])
def test_registered_with_paper(name, kind):
    row = methods().set_index("name").loc[name]
    assert row.category == "adapter" and len(row.paper) > 20

def test_routing_shapes():
    m = randomised("mixda", dict(n_domains=3, r=2, task_r=0)); m(IDS)
    assert [l.last_gate.shape for l in m.modules() if isinstance(l, MixdaMLP)] == [(3, 6, 4)] * 2
    m = randomised("l2m", dict(pool_size=4, top_k=2, r=2)); m(IDS)
    assert m.l2m_keys.last_selected.shape == (3, 2) and int(m.l2m_keys.last_selected.max()) < 4
    m(IDS, task_ids=[3, 0, 1])
    assert m.l2m_keys.last_selected.tolist() == [[3], [0], [1]]

def test_key_loss_pulls_the_chosen_key_towards_its_query():
    torch.manual_seed(0)
    keys, q = L2mKeys(5, 16, top_k=2, key_weight=1.0), torch.randn(4, 16)
    chosen = keys(q); keys.aux_loss.backward()
    rows = set(chosen.flatten().tolist())
    assert all((keys.keys.grad[j] == 0).all() for j in range(5) if j not in rows)
    before = keys.similarity(q).gather(1, chosen).sum()
    with torch.no_grad(): keys.keys -= 0.05 * keys.keys.grad
    assert keys.similarity(q).gather(1, chosen).sum() > before

def test_stages_train_their_parts():
    m = apply(tiny_llama(), "mixda", n_domains=2, r=2, task_r=2)
    batch = [dict(input_ids=IDS, attention_mask=torch.ones_like(IDS), labels=IDS)]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    train_domain_adapter(m, 1, batch, steps=2, lr=1e-2, general=batch, progress=False)
    assert {k for k, v in m.state_dict().items() if not torch.equal(v, before[k])} <= {k for k in before if ".domain_adapters.1." in k}
    before = {k: v.clone() for k, v in m.state_dict().items()}
    train_mixda_task(m, batch, steps=2, lr=1e-2, progress=False)
    moved = {k for k, v in m.state_dict().items() if not torch.equal(v, before[k])}
    assert moved and all(".gate." in k or ".task_adapter." in k for k in moved)

@pytest.mark.parametrize("call,message", [
    (lambda: apply(tiny_llama(), "mixda", targets=["v_proj"]), "is not a gated MLP block"),
    (lambda: train_domain_adapter(apply(tiny_llama(), "mixda"), 5, [], 1), "domain=5 is out of range"),
    (lambda: train_mixda_task(tiny_llama(), [], 1), "has no MixDA blocks"),
    (lambda: apply(tiny_llama(), "l2m", pool_size=2, top_k=3), "top_k=3 must be between 1 and the number of modulators (2)"),
    (lambda: apply(tiny_llama(), "l2m", r=100), "does not fit"),
    (lambda: apply(tiny_llama(), "l2m")(IDS, task_ids=[0, 1, 9]), "task id 9 is out of range"),
    (lambda: apply(tiny_llama(), "levi", layers=[-3]), "layer -3 is out of range"),
    (lambda: apply(tiny_llama(), "levi", layers=[]), "layers is empty"),
    (lambda: apply(tiny_llama(), "levi", small_width=10, small_heads=2), "must be a multiple of 2·small_heads=4"),
    (lambda: apply(tiny_llama(), "levi")(inputs_embeds=torch.randn(1, 2, 64)), "call the model with input_ids"),
])
def test_bad_input(call, message):
    with pytest.raises((ValueError, TypeError)) as e: call()
    assert message in str(e.value), str(e.value)
