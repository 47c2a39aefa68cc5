"Moving updates to a new base (merge.transfer) and FLoRA's stacking (merge.flora), against mergekit and PEFT."
import copy
import pytest
import torch
from peftlab.core.models import tiny_llama
from peftlab.core.registry import apply, methods
from peftlab.core.adapter import adapters
from peftlab.merge.task_vectors import model_weights
from peftlab.merge.transfer import transfer_update, port_adapter
from peftlab.merge.flora import stack_lora, fedavg_lora, flora_aggregate

V = 256   # a small vocabulary keeps the state dicts small

def models(vocab=V):
    return tiny_llama(seed=0, vocab_size=vocab), tiny_llama(seed=1, vocab_size=vocab), tiny_llama(seed=2, vocab_size=vocab)

# ---- fine-tuning transfer = mergekit's task arithmetic with the old base as base and weights (λ, 1)
@pytest.mark.parametrize("scale", [1.0, 0.5, -1.0])
def test_transfer_is_mergekit_task_arithmetic(scale):
    from mergekit.merge_methods.api import merge_state_dicts
    old, tuned, new = models()
    sd = [{k: v.detach() for k, v in m.state_dict().items()} for m in (old, tuned, new)]
    theirs = merge_state_dicts(sd, "task_arithmetic", parameters={"weight": [scale, 1.0]}, base=0)
    ours = transfer_update(old, tuned, new, scale=scale).state_dict()
    for k, v in theirs.items(): torch.testing.assert_close(ours[k], v, atol=1e-5, rtol=1e-5)

@pytest.mark.parametrize("rows", [(V, V + 8, V + 16), (V + 8, V, V - 16), (V, V, V + 3)])   # old base, old tuned, new base
def test_vocab_truncate_is_mergekit_truncate_vocabulary(rows):
    "On the common token-id prefix we match mergekit's truncate_vocabulary + task arithmetic; past it the new base is kept."
    from mergekit.merge_methods import get
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods.preprocessing import truncate_vocabulary
    old, tuned, new = (tiny_llama(seed=s, vocab_size=r) for s, r in zip(range(3), rows))
    key, n = "model.embed_tokens.weight", min(rows)
    group = truncate_vocabulary(TensorGroup.from_tensors([model_weights(m)[key].detach() for m in (old, tuned, new)],
                                                         base_index=0, name=key, vocabulary_axis=0))
    (theirs,) = get("task_arithmetic")((group,), parameters={"weight": [1.0, 1.0]})
    ours = transfer_update(old, tuned, new, vocab="truncate").model.embed_tokens.weight.detach()
    torch.testing.assert_close(ours[:n], theirs, atol=1e-5, rtol=1e-5)
    assert torch.equal(ours[n:], new.model.embed_tokens.weight.detach()[n:])

def test_transfer_leaves_inputs_alone_and_names_mismatches():
    old, tuned, new = models()
    before = [{k: v.clone() for k, v in model_weights(m).items()} for m in (old, tuned, new)]
    transfer_update(old, tuned, new)
    for m, b in zip((old, tuned, new), before):
        for k, v in model_weights(m).items(): assert torch.equal(v, b[k])
    with pytest.raises(ValueError, match="vocab='truncate'"): transfer_update(old, tuned, tiny_llama(vocab_size=V + 1))
    with pytest.raises(ValueError, match="mlp.gate_proj.weight' has shape"): transfer_update(old, tuned, tiny_llama(vocab_size=V, intermediate_size=96), vocab="truncate")

# ---- PortLLM: the patch moves bit for bit, and PEFT reads the ported adapter with the same outputs
def test_port_adapter_equal_deltas_and_peft_roundtrip(tmp_path):
    import peft
    from peftlab.core.io import save_adapter
    old = apply(tiny_llama(seed=0, vocab_size=V), "lora", name="task", r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
    torch.manual_seed(0)
    for a in adapters(old).values(): torch.nn.init.normal_(a.lora_B.weight, std=0.05)
    ported = port_adapter(old, tiny_llama(seed=1, vocab_size=V))
    assert set(adapters(ported)) == set(adapters(old))
    for n, a in adapters(old).items(): assert torch.equal(adapters(ported)[n].delta_weight(), a.delta_weight())
    save_adapter(ported, tmp_path, name="task")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(seed=1, vocab_size=V), tmp_path)
    x = torch.randint(0, V, (2, 7))
    torch.testing.assert_close(theirs(x).logits, ported(x).logits, atol=1e-5, rtol=1e-5)

# ---- FLoRA's stack = PEFT's add_weighted_adapter(combination_type="cat")
def test_stack_is_peft_cat():
    import peft
    base = tiny_llama(seed=0, vocab_size=V)
    ranks, alphas, weights = [2, 4, 8], [4, 4, 32], [0.2, 0.3, 0.5]
    m = None
    for i, (r, a) in enumerate(zip(ranks, alphas)):
        cfg = peft.LoraConfig(r=r, lora_alpha=a, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
        m = peft.get_peft_model(base, cfg, adapter_name=f"c{i}") if m is None else (m.add_adapter(f"c{i}", cfg) or m)
    m.add_weighted_adapter([f"c{i}" for i in range(3)], weights, "global", combination_type="cat")
    checked = 0
    for name, mod in m.named_modules():
        if not (hasattr(mod, "lora_A") and "global" in getattr(mod, "lora_A", {})): continue
        As = [mod.lora_A[f"c{i}"].weight.detach() for i in range(3)]
        Bs = [mod.lora_B[f"c{i}"].weight.detach() for i in range(3)]
        A, B = stack_lora(As, Bs, weights, [mod.scaling[f"c{i}"] for i in range(3)])
        theirs = mod.get_delta_weight("global").detach()
        torch.testing.assert_close(B @ A, theirs, atol=1e-5, rtol=1e-5); checked += 1
    assert checked == 4   # q_proj and down_proj in both layers

@pytest.mark.parametrize("ranks", [[4, 4, 4], [2, 4, 8], [8]])
def test_stack_exact_and_fedavg_cross_terms(ranks):
    g = torch.Generator().manual_seed(len(ranks))
    As = [torch.randn(r, 12, generator=g) for r in ranks]; Bs = [torch.randn(10, r, generator=g) for r in ranks]
    exact = sum(B @ A for A, B in zip(As, Bs)) / len(ranks)
    A, B = stack_lora(As, Bs)
    torch.testing.assert_close(B @ A, exact, atol=1e-5, rtol=1e-5)
    A_, B_ = fedavg_lora(As, Bs)
    err = ((B_ @ A_ - exact).norm() / exact.norm()).item()
    assert err < 1e-6 if len(ranks) == 1 else err > 0.1

def test_registered():
    names = set(methods("merge").name)
    assert {"fine-tuning-transfer", "portllm", "trans-lora", "flora"} <= names
