"The sparse delta's algebra and files, the sparse layer's gradient, the selection rules on hand-checked tensors, and LT-SFT through save_adapter / load_adapter."
import json, tempfile
import pytest, torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from peftlab.core.models import tiny_llama
from peftlab.core.registry import apply, methods
from peftlab.core.io import save_adapter, load_adapter
from peftlab.core.adapter import adapters
from peftlab.core.named import adapter_names
from peftlab.core.surgery import trainable_report
from peftlab.core.testing import assert_close
from peftlab.sparse.core import (SparseDelta, compose, load_delta, SparseMatmul, SparseLinear, scatter_dense, sparse_delta,
                                 sparse_layers, GradientStats, gradient_stats, entry_scores, select_entries, inject_sparse)

X = torch.randint(3, 1000, (2, 9), generator=torch.Generator().manual_seed(1))

def delta(seed, shape=(6, 5), k=7, name="w"):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(shape[0] * shape[1], generator=g)[:k].sort().values
    return SparseDelta({name: idx}, {name: torch.randn(k, generator=g, dtype=torch.float64)}, {name: shape})

def test_algebra_matches_dense():
    a, b, c = delta(0), delta(1), delta(2)
    D = lambda d: d.to_dense("w")
    assert_close(D(a + b), D(a) + D(b)); assert_close(D(a - b), D(a) - D(b)); assert_close(D(a.scale(-2.5)), -2.5 * D(a))
    assert_close(D((a + b) + c), D(a + (b + c))); assert_close(D(a + b), D(b + a))
    assert_close(D(compose([a, b, c], [1, 0.5, -1])), D(a) + 0.5 * D(b) - D(c))
    assert_close(D((a + b) - b), D(a))   # float64: exact to rounding
    assert (a + b).nnz == len(set(a.indices["w"].tolist()) | set(b.indices["w"].tolist()))

def test_any_density_round_trips_through_a_file(tmp_path):
    for k in (1, 15, 30):   # from one entry to dense
        d = delta(k, k=k) + SparseDelta.from_dense({"v": torch.randn(3, 4, 2)})
        d.save(tmp_path/"d.safetensors"); back = load_delta(tmp_path/"d.safetensors")
        for n in d.names: assert torch.equal(back.to_dense(n), d.to_dense(n)) and back.shapes[n] == d.shapes[n]
    assert not list(tmp_path.glob(".*.tmp"))   # the atomic write left no temporary file

def test_bad_files_and_shapes_are_refused(tmp_path):
    save_file({"w.indices": torch.tensor([0, 30]), "w.values": torch.ones(2), "w.shape": torch.tensor([6, 5])}, tmp_path/"a.safetensors")
    with pytest.raises(ValueError, match="w: indices out of range"): load_delta(tmp_path/"a.safetensors")
    save_file({"w.indices": torch.tensor([0]), "w.values": torch.ones(1)}, tmp_path/"b.safetensors")
    with pytest.raises(ValueError, match="lacks one of"): load_delta(tmp_path/"b.safetensors")
    (tmp_path/"c.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot be read"): load_delta(tmp_path/"c.safetensors")
    with pytest.raises(ValueError, match="disagree on the shape"): delta(0) + delta(1, shape=(5, 6))

def test_merge_unmerge_and_a_base_of_another_shape():
    m = tiny_llama(); name = "model.layers.1.mlp.up_proj.weight"
    d = delta(3, shape=(128, 64), k=50, name=name)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    out = m(X).logits; d.merge_into(m)
    assert_close(m.state_dict()[name], before[name] + d.to_dense(name).float())
    d.unmerge_from(m); assert_close(m(X).logits, out, rtol=1e-5, atol=1e-5)
    small = tiny_llama(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1)
    snap = {k: v.clone() for k, v in small.state_dict().items()}
    two = d + delta(4, shape=(48, 32), k=5, name="model.layers.0.mlp.up_proj.weight")   # the second name fits, the first does not
    with pytest.raises(ValueError, match="the delta was made for another model"): two.merge_into(small)
    assert all(torch.equal(v, snap[k]) for k, v in small.state_dict().items())

def test_sparse_matmul_gradient_equals_dense_autograd():
    x = torch.randn(2, 4, 9, dtype=torch.float64, requires_grad=True); v = torch.randn(11, dtype=torch.float64, requires_grad=True)
    idx = torch.randperm(7 * 9, generator=torch.Generator().manual_seed(0))[:11].sort().values
    assert torch.autograd.gradcheck(lambda x, v: SparseMatmul.apply(x, v, idx, (7, 9)), (x, v))

def test_layer_has_no_dense_weight_gradient_and_counts_its_entries():
    m = tiny_llama()
    inject_sparse(m, ["q_proj"], lambda n, base: torch.arange(0, 4096, 7))
    m(X, labels=X).loss.backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert set(grads) == {f"model.layers.{i}.self_attn.q_proj.sparse_values" for i in range(2)}
    rep = trainable_report(m)
    assert rep.trainable == 2 * len(range(0, 4096, 7)) and rep.by_module == {"SparseLinear": rep.trainable}

def test_selection_rules_hand_checked():
    w = {"w": torch.tensor([[1., -4.], [0.5, 2.]])}
    st = GradientStats().add({"w": torch.tensor([[3., 1.], [0., 1.]])}).add({"w": torch.tensor([[-3., 1.], [0., 2.]])})
    expect = dict(magnitude=[1, 3], gradient=[1, 3], fisher=[0, 3], snip=[1, 3])
    expect["accumulated-gradient"] = [0, 3]
    for rule, idx in expect.items(): assert select_entries(entry_scores(rule, w, st), 0.5)["w"].tolist() == idx, rule
    assert select_entries({"w": torch.tensor([[1., 1.], [5., 0.]])}, 0.5, "rows")["w"].tolist() == [2, 3]
    assert select_entries({"w": torch.tensor([[1., 1.], [5., 0.]])}, 0.5, "cols")["w"].tolist() == [0, 2]
    r1, r2 = (select_entries(entry_scores("random", {"w": torch.zeros(10, 10)}, seed=s), 0.1)["w"] for s in (0, 0))
    assert torch.equal(r1, r2) and len(r1) == 10
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"): select_entries(w, 1.5)

def test_gradient_stats_on_a_model():
    m = tiny_llama(); w = {"q": m.model.layers[0].self_attn.q_proj.weight}
    batches = [dict(input_ids=X, labels=X), dict(input_ids=X.flip(1), labels=X.flip(1))]
    st = gradient_stats(m, w, batches)
    g = [torch.autograd.grad(m(**b).loss, w["q"])[0] for b in batches]
    assert_close(st.total["q"], g[0] + g[1]); assert_close(st.squared["q"], g[0] ** 2 + g[1] ** 2)
    assert all(p.requires_grad for p in m.parameters())   # flags restored

def _data():
    return [dict(input_ids=X, attention_mask=torch.ones_like(X), labels=X)]

def test_lt_sft_saves_and_loads_through_save_adapter(tmp_path):
    m = apply(tiny_llama(), "lt-sft", density=0.03, data=_data(), full_steps=2, full_lr=1e-2)
    with torch.no_grad():
        for l in sparse_layers(m).values(): l.sparse_values.normal_()
    save_adapter(m, tmp_path)
    assert json.loads((tmp_path/"adapter_config.json").read_text())["peftlab_method"] == "lt-sft"
    back = load_adapter(tiny_llama(), tmp_path)
    assert_close(back(X).logits, m(X).logits)
    for n, l in sparse_layers(back).items(): assert torch.equal(l.sparse_indices, sparse_layers(m)[n].sparse_indices)
    sd = load_file(tmp_path/"adapter_model.safetensors")
    sd["base_model.model.model.layers.0.mlp.up_proj.sparse_indices"][-1] = 10**6
    save_file(sd, tmp_path/"adapter_model.safetensors")
    base = tiny_llama()
    with pytest.raises(ValueError, match="up_proj: indices out of range"): load_adapter(base, tmp_path)
    assert not hasattr(base, "peftlab_method") and type(base.model.layers[0].mlp.up_proj) is nn.Linear

def test_lt_sft_composes_through_sparse_deltas():
    a = apply(tiny_llama(), "lt-sft", density=0.02, data=_data(), full_steps=2, full_lr=1e-2, seed=0)
    with torch.no_grad():
        for l in sparse_layers(a).values(): l.sparse_values.normal_()
    b = apply(tiny_llama(), "lt-sft", density=0.02, seed=1)   # random entries
    with torch.no_grad():
        for l in sparse_layers(b).values(): l.sparse_values.normal_()
    both = tiny_llama(); compose([sparse_delta(a), sparse_delta(b)]).merge_into(both)
    step = tiny_llama(); sparse_delta(a).merge_into(step); sparse_delta(b).merge_into(step)
    assert_close(both(X).logits, step(X).logits, rtol=1e-5, atol=1e-5)

@pytest.mark.parametrize("method,kw", [("lt-sft", dict(density=0)), ("lt-sft", dict(density=1.01)), ("shira", dict(r=0))])
def test_bad_densities_are_refused_by_the_registry(method, kw):
    with pytest.raises(ValueError, match="must be"): apply(tiny_llama(), method, **kw)

def test_registered_as_sparse_with_papers():
    t = methods("sparse").set_index("name")
    assert t.loc["shira", "paper"] == "Sparse High Rank Adapters" and t.loc["shira", "peft"] == "SHIRA"
    assert t.loc["lt-sft", "paper"] == "Composable Sparse Fine-Tuning for Cross-Lingual Transfer"

@pytest.mark.parametrize("method,kw", [("shira", dict(r=2)), ("lt-sft", dict(density=0.01))])
def test_beside_a_lora_refuses_and_changes_nothing(method, kw):
    "As the named-adapter table test asks of every method: beside a LoRA a sparse method refuses clearly, nothing changed."
    model = apply(tiny_llama(), "lora", r=4, targets=["q_proj", "v_proj", "down_proj"])
    out, n_layers = model(X).logits, len(adapters(model))
    with pytest.raises(ValueError, match="cannot add"): apply(model, method, name="x", **kw)
    assert adapter_names(model) == ["default"] and len(adapters(model)) == n_layers
    assert_close(model(X).logits, out)
