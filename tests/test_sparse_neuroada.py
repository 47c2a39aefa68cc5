"NeuroAda: every neuron gets exactly k bypass entries on its largest |W|, the count is k x rows, the bypass trains through gathered gradients only, merges and unmerges exactly, round-trips through save_adapter / load_adapter, and bad k or bases of another shape are refused with the model left as it was."
import pytest, torch
from safetensors.torch import load_file, save_file
from torch import nn
import torch.nn.functional as F
from peftlab.core.models import tiny_llama
from peftlab.core.registry import apply
from peftlab.core.io import save_adapter, load_adapter
from peftlab.core.adapter import adapters, merge
from peftlab.core.testing import assert_close
from peftlab.sparse.core import sparse_layers, scatter_dense
from peftlab.sparse.neuroada import top_k_per_row

X = torch.randint(3, 1000, (2, 9), generator=torch.Generator().manual_seed(1))

# tiny-llama's rows per layer: q 64, k 32, v 32, o 64, gate 128, up 128, down 64; two layers
COUNTS = [(1, ["q_proj"], 1 * 64 * 2), (3, ["q_proj", "down_proj"], 3 * (64 + 64) * 2),
          (2, ["k_proj", "up_proj"], 2 * (32 + 128) * 2), (8, "all-linear", 8 * 512 * 2), (64, ["q_proj"], 64 * 64 * 2)]

@pytest.mark.parametrize("k,targets,count", COUNTS)
def test_trainable_count_is_k_per_row(k, targets, count):
    m = apply(tiny_llama(), "neuroada", k=k, targets=targets)
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == count
    for l in sparse_layers(m).values():
        per_row = torch.bincount(l.sparse_indices // l.in_features, minlength=l.out_features)
        assert (per_row == k).all()
        w = l.base_layer.weight.detach().abs()
        picked = w.flatten()[l.sparse_indices].view(l.out_features, k)
        assert (picked.min(1).values >= w.topk(k, dim=1).values[:, -1]).all()

# hand-checked: (scores, k, sorted flat indices)
ROWS = [(torch.tensor([[0.1, 5., 0.2, 3.], [4., 0.3, 2., 0.1]]), 2, [1, 3, 4, 6]),
        (torch.tensor([[1., 2., 3.]]), 1, [2]),
        (torch.tensor([[3.], [1.]]), 1, [0, 1])]

@pytest.mark.parametrize("scores,k,expected", ROWS)
def test_top_k_per_row(scores, k, expected):
    assert top_k_per_row(scores, k).tolist() == expected

def _perturbed(k=2, targets=("q_proj", "down_proj")):
    m = apply(tiny_llama(), "neuroada", k=k, targets=list(targets))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for l in sparse_layers(m).values(): l.sparse_values.copy_(torch.randn(l.sparse_values.shape, generator=g) * 0.1)
    return m

def test_gradient_reaches_only_the_bypass_and_matches_the_dense_one():
    m = apply(tiny_llama(), "neuroada", k=2, targets=["q_proj"])
    m(X).logits.square().mean().backward()
    assert all(p.grad is None for n, p in m.named_parameters() if not n.endswith("sparse_values"))
    # the same loss through a dense Δ per layer: its gradient at the chosen positions is the bypass's gradient
    ref, dense = tiny_llama().requires_grad_(False), []
    for layer in ref.model.layers:
        base = layer.self_attn.q_proj; d = torch.zeros(64, 64, requires_grad=True); dense.append(d)
        base.forward = lambda x, base=base, d=d: F.linear(x, base.weight + d, base.bias)
    ref(X).logits.square().mean().backward()
    for layer, d in zip(m.model.layers, dense):
        q = layer.self_attn.q_proj
        assert_close(q.sparse_values.grad, d.grad.flatten()[q.sparse_indices])

def test_merge_and_unmerge_are_exact():
    m = _perturbed(); out = m(X).logits
    before = {n: l.base_layer.weight.detach().clone() for n, l in sparse_layers(m).items()}
    for n, l in sparse_layers(m).items():
        l.merge()
        assert torch.equal((l.base_layer.weight.detach() - before[n]) != 0, scatter_dense(l.sparse_values.detach(), l.sparse_indices, l.shape) != 0)
    assert_close(m(X).logits, out)
    for n, l in sparse_layers(m).items():
        l.unmerge(); assert_close(l.base_layer.weight.detach(), before[n])
    plain = merge(m, unload_adapters=True)
    assert not adapters(plain); assert_close(plain(X).logits, out)

def test_round_trip(tmp_path):
    m = _perturbed()
    save_adapter(m, tmp_path); back = load_adapter(tiny_llama(), tmp_path)
    assert_close(back(X).logits, m(X).logits)

def test_a_base_of_another_shape_is_refused_and_left_as_it_was(tmp_path):
    save_adapter(_perturbed(), tmp_path)
    other = tiny_llama(intermediate_size=96)
    snap = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises((ValueError, KeyError), match="another|shape mismatch|out of range"): load_adapter(other, tmp_path)
    assert not adapters(other) and all(torch.equal(v, snap[k]) for k, v in other.state_dict().items())

def test_indices_out_of_range_in_a_file(tmp_path):
    save_adapter(_perturbed(), tmp_path)
    f = next(tmp_path.glob("*.safetensors")); t = load_file(f)
    key = next(k for k in t if k.endswith("sparse_indices")); t[key] = t[key].clone(); t[key][-1] = 10**9
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="out of range"): load_adapter(tiny_llama(), tmp_path)

BAD = [(dict(k=0), "must be >= 1"), (dict(k=-3), "must be >= 1"),
       (dict(k=65, targets=["q_proj"]), "exceeds the 64 input connections"),
       (dict(k=100, targets="all-linear"), "choose k <= 64")]

@pytest.mark.parametrize("kw,message", BAD)
def test_bad_k_is_refused_and_the_model_left_as_it_was(kw, message):
    m = tiny_llama(); snap = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=message): apply(m, "neuroada", **kw)
    assert not adapters(m) and all(torch.equal(v, snap[k]) for k, v in m.state_dict().items())
