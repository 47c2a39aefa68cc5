"The sparse methods beyond the core (SpIEL, S2FT, DSEE, MIGU, grafting, LIFT, SaRA) through save_adapter / load_adapter: round trips, bad densities, files with indices out of range, and bases of another shape, which must be left as they were."
import pytest, torch
from safetensors.torch import load_file, save_file
from torch import nn
from peftlab.core.models import tiny_llama
from peftlab.core.registry import apply
from peftlab.core.io import save_adapter, load_adapter
from peftlab.core.adapter import adapters
from peftlab.core.testing import assert_close
from peftlab.sparse.spiel import move_entries, drop_and_grow
from peftlab.sparse.s2ft import permute_attention, permute_mlp, merge_unpermuted

X = torch.randint(3, 1000, (2, 9), generator=torch.Generator().manual_seed(1))

# method, options for a small adapter
METHODS = [("spiel", dict(density=0.05, targets=["q_proj", "down_proj"])),
           ("s2ft", dict(d_ratio=0.1, o_ratio=0.25)),
           ("migu", dict(keep=0.5, targets=["v_proj", "up_proj"])),
           ("dsee", dict(r=2, density=0.02, targets=["q_proj", "down_proj"])),
           ("grafting", dict(density=0.02, targets=["q_proj", "down_proj"])),
           ("lift", dict(density=0.05, rank=4, targets=["q_proj", "down_proj"])),
           ("sara", dict(density=0.05, targets=["q_proj", "down_proj"]))]

def _perturbed(method, kw):
    m = apply(tiny_llama(), method, **kw)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad: p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    return m

@pytest.mark.parametrize("method,kw", METHODS)
def test_round_trip(tmp_path, method, kw):
    m = _perturbed(method, kw)
    save_adapter(m, tmp_path); back = load_adapter(tiny_llama(), tmp_path)
    assert_close(back(X).logits, m(X).logits)

@pytest.mark.parametrize("method,kw", METHODS)
def test_a_base_of_another_shape_is_refused_and_left_as_it_was(tmp_path, method, kw):
    save_adapter(_perturbed(method, kw), tmp_path)
    other = tiny_llama(intermediate_size=96)
    snap = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises((ValueError, KeyError), match="another|shape mismatch"): load_adapter(other, tmp_path)
    assert not adapters(other)
    assert all(torch.equal(v, snap[k]) for k, v in other.state_dict().items())

BAD = [("spiel", dict(density=0), "must be > 0"), ("spiel", dict(density=1.01), "must be > 0 and <= 1"),
       ("spiel", dict(density=float("nan")), "density"), ("s2ft", dict(d_ratio=-0.1), "must be >= 0"),
       ("s2ft", dict(d_ratio=0, o_ratio=0), "nothing would train"), ("migu", dict(keep=0), "must be > 0"),
       ("migu", dict(keep=2), "<= 1"), ("dsee", dict(density=0), "must be > 0"), ("grafting", dict(density=1.5), "<= 1"),
       ("lift", dict(density=-0.5), "must be > 0"), ("sara", dict(density=1.5), "<= 1"), ("sara", dict(nuclear_weight=-1), "must be >= 0")]

@pytest.mark.parametrize("method,kw,message", BAD)
def test_bad_densities(method, kw, message):
    m = tiny_llama(); snap = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")): apply(m, method, **kw)
    assert not adapters(m) and all(torch.equal(v, snap[k]) for k, v in m.state_dict().items())

@pytest.mark.parametrize("method,kw", [c for c in METHODS if c[0] in ("spiel", "dsee", "grafting", "lift", "sara")])
def test_indices_out_of_range_in_a_file(tmp_path, method, kw):
    save_adapter(_perturbed(method, kw), tmp_path)
    sd = load_file(tmp_path/"adapter_model.safetensors")
    key = next(k for k in sd if k.endswith("q_proj.sparse_indices"))
    sd[key] = sd[key].clone(); sd[key][-1] = 64 * 64
    save_file(sd, tmp_path/"adapter_model.safetensors")
    base = tiny_llama(); snap = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match="indices out of range"): load_adapter(base, tmp_path)
    assert not adapters(base) and all(torch.equal(v, snap[k]) for k, v in base.state_dict().items())

def test_spiel_moves_adam_state_with_the_values():
    from peftlab.sparse.core import SparseLinear
    layer = SparseLinear(nn.Linear(4, 3).requires_grad_(False), torch.tensor([0, 2, 5, 7]))
    opt = torch.optim.AdamW([layer.sparse_values], lr=0.1)
    with torch.no_grad(): layer.sparse_values.copy_(torch.tensor([1., 0.01, -2., 0.02]))
    layer.sparse_values.grad = torch.ones(4); opt.step()
    avg = opt.state[layer.sparse_values]["exp_avg"].clone(); vals = layer.sparse_values.detach().clone()
    grad = torch.zeros(3, 4); grad.view(-1)[[1, 11]] = torch.tensor([3., -4.])
    moved = move_entries(layer, opt, grad, 2)
    assert moved == 2 and layer.sparse_indices.tolist() == [0, 1, 5, 11]
    st = opt.state[layer.sparse_values]["exp_avg"]
    assert torch.equal(st, torch.stack([avg[0], torch.tensor(0.), avg[2], torch.tensor(0.)]))
    assert torch.equal(layer.sparse_values.detach(), torch.stack([vals[0], torch.tensor(0.), vals[2], torch.tensor(0.)]))

@pytest.mark.parametrize("heads,kv", [(4, 4), (4, 2), (4, 1)])
def test_s2ft_permutations_keep_the_function(heads, kv):
    m = tiny_llama(num_attention_heads=heads, num_key_value_heads=kv); out = m(X).logits
    g = torch.Generator().manual_seed(heads + kv)
    for layer in m.model.layers:
        permute_attention(layer.self_attn, torch.randperm(kv, generator=g)); permute_mlp(layer.mlp, torch.randperm(128, generator=g))
    assert_close(m(X).logits, out, rtol=1e-5, atol=1e-5)

def test_s2ft_merge_unpermuted_changes_only_the_chosen_columns():
    m = _perturbed("s2ft", dict(d_ratio=0.1)); out = m(X).logits
    plain = merge_unpermuted(m); ref = tiny_llama()
    assert_close(plain(X).logits, out, rtol=1e-4, atol=1e-4)
    for n, p in plain.named_parameters():
        changed = (p != ref.get_parameter(n))
        if n.endswith("down_proj.weight"): assert 0 < int(changed.any(0).sum()) < p.shape[1]
        else: assert not changed.any(), n
