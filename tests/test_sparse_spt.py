"SPT (sensitivity-aware budget: LoRA where sensitive entries crowd a matrix, the entries alone elsewhere): the budget is met exactly, round trips through save_adapter / load_adapter, merging, bad options and files for another base."
import pytest, torch
from peftlab.core.models import tiny_llama
from peftlab.core.registry import apply
from peftlab.core.io import save_adapter, load_adapter
from peftlab.core.adapter import adapters, merge
from peftlab.core.surgery import find_targets, trainable_report
from peftlab.core.testing import assert_close
from peftlab.adapters.lora import LoraLinear
from peftlab.sparse.core import entry_count
from peftlab.sparse.spt import split_budget

G = torch.Generator().manual_seed(3)
DATA = [dict(input_ids=(ids := torch.randint(3, 1000, (2, 10), generator=G)), labels=ids) for _ in range(2)]
X = torch.randint(3, 1000, (2, 9), generator=torch.Generator().manual_seed(1))

# options, whether some layers must be LoRA, whether some must be sparse, trainable count (None: the budget exactly)
CASES = [(dict(budget=0.05, r=2, alpha=4, targets=["q_proj", "k_proj", "v_proj", "o_proj"]), True, True, None),
         (dict(budget=0.02, r=4, targets="all-linear", threshold=1e9), False, True, None),
         (dict(budget=1.0, r=1, targets=["q_proj", "down_proj"]), True, False, 2 * (64 + 64) + 2 * (128 + 64))]   # all LoRA: its cost alone

def _spt(kw, seed=0):
    m = apply(tiny_llama(), "spt", data=DATA, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad: p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    return m

@pytest.mark.parametrize("kw,some_lora,some_sparse,count", CASES)
def test_budget_is_spent_exactly(kw, some_lora, some_sparse, count):
    m = apply(tiny_llama(), "spt", data=DATA, **kw)
    total = sum(l.weight.numel() for l in find_targets(tiny_llama(), kw["targets"]).values())
    assert trainable_report(m).trainable == (count or entry_count(total, kw["budget"]))
    kinds = [isinstance(l, LoraLinear) for l in adapters(m).values()]
    assert any(kinds) == some_lora and (not all(kinds)) == some_sparse, kinds

@pytest.mark.parametrize("kw", [c[0] for c in CASES])
def test_round_trip_and_merge(tmp_path, kw):
    m = _spt(kw)
    save_adapter(m, tmp_path); back = load_adapter(tiny_llama(), tmp_path)
    assert_close(back(X).logits, m(X).logits)
    out = m(X).logits; merge(m); assert_close(m(X).logits, out, atol=1e-5, rtol=1e-5)

def test_another_base_is_refused_and_left_bare(tmp_path):
    save_adapter(_spt(CASES[0][0]), tmp_path)
    other = tiny_llama(hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    snap = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="shape mismatch"): load_adapter(other, tmp_path)
    assert not adapters(other) and all(torch.equal(v, snap[k]) for k, v in other.state_dict().items())

def test_a_sparse_only_file_with_indices_out_of_range_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    save_adapter(_spt(CASES[1][0]), tmp_path)
    f = tmp_path/"adapter_model.safetensors"; state = load_file(f)
    key = next(k for k in state if k.endswith("sparse_indices") and len(state[k]))
    state[key] = state[key].clone(); state[key][-1] = 10**9
    save_file(state, f)
    with pytest.raises(ValueError, match="indices out of range"): load_adapter(tiny_llama(), tmp_path)

@pytest.mark.parametrize("options,message", [
    (dict(budget=0, data=DATA), "must be > 0"), (dict(budget=2.0, data=DATA), "<= 1"),
    (dict(threshold=0.5, data=DATA), "must be >= 1"), (dict(r=0, data=DATA), "must be >= 1"),
    (dict(budget=0.05), "pass data=[batches]"),
    (dict(plan={"model.layers.0.self_attn.q_proj": "dense"}), "'lora' or 'sparse'"),
    (dict(plan={"model.layers.9.self_attn.q_proj": "lora"}), "not targets of this model"),
    (dict(plan={"model.layers.0.self_attn.q_proj": "lora"}, data=DATA), "not both"),
])
def test_bad_options(options, message):
    m = tiny_llama(); before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises((ValueError, TypeError, KeyError)) as e: apply(m, "spt", **options)
    assert message in str(e.value), str(e.value)
    assert not adapters(m) and all(torch.equal(v, before[k]) for k, v in m.state_dict().items())

@pytest.mark.parametrize("budget,structured", [(12, {"a"}), (14, {"a", "c"}), (4, set())])
def test_split_budget_table(budget, structured):
    sc = {"a": 10 + torch.arange(16.).view(4, 4), "b": torch.arange(16.).view(4, 4) / 100, "c": torch.tensor([[5., 4, 3, 2], [1, .5, .4, .3]])}
    got, entries = split_budget(sc, budget, r=1)
    assert got == structured
    assert sum(1 * (s.shape[0] + s.shape[1]) for n, s in sc.items() if n in got) + sum(len(i) for i in entries.values()) == budget
