"TuCo, cross-model path patching and conjugate prompting on hand-checked cases, and their errors for bad input."
import copy
import pytest
import torch
from torch import nn
from peftlab.core.models import tiny_llama
from peftlab.core.registry import apply, methods
from peftlab.core.named import disabled_adapters
from peftlab.analysis.tuco import tuco, tuning_contribution, steered_logits
from peftlab.analysis.path_patching import path_patching, patch_recovery
from peftlab.analysis.conjugate_prompting import substitution, conjugate_prompting

V = 40
IDS = torch.randint(3, V, (3, 7), generator=torch.Generator().manual_seed(0))
BATCH = dict(input_ids=IDS, labels=IDS.masked_fill(torch.arange(7) < 4, -100))   # the last 3 tokens are the answer

def lora_model(std:float=0.3, layers:int=2)->nn.Module:
    "tiny-llama with a LoRA whose B is random (a non-zero update), the same every call."
    m = apply(tiny_llama(vocab_size=V, num_hidden_layers=layers), "lora", r=2)
    g = torch.Generator().manual_seed(1)
    for a in m.modules():
        if hasattr(a, "lora_B"): nn.init.normal_(a.lora_B.weight, std=std, generator=g)
    return m

def one_module_tuned(layer:int, module:str)->tuple[nn.Module,nn.Module]:
    "A base and a copy whose block `layer` has only its `module` ('self_attn' or 'mlp') changed."
    base = tiny_llama(vocab_size=V); tuned = copy.deepcopy(base)
    block = getattr(tuned.model.layers[layer], module)
    w = (block.o_proj if module == "self_attn" else block.down_proj).weight
    with torch.no_grad(): w.add_(0.5 * torch.randn(w.shape, generator=torch.Generator().manual_seed(2)))
    return base, tuned

# ℓ1 and ℓ2 TuCo of summed components, worked out by hand
TUCO_CASES = [([3.5, -3.5], [1.75, -1.75], 1, 1 / 3),   # FTC = PTC / 2 in any norm
              ([1., 1.], [3., 0.], 1, 3 / 5),
              ([1., 1.], [3., 0.], 2, 3 / (3 + 2 ** 0.5)),
              ([0., 0.], [2., 0.], 1, 1.0),
              ([0., 0.], [0., 0.], 1, 0.0)]

@pytest.mark.parametrize("ptc,ftc,norm,want", TUCO_CASES)
def test_tuning_contribution(ptc, ftc, norm, want):
    assert tuning_contribution(torch.tensor(ptc), torch.tensor(ftc), norm).item() == pytest.approx(want, abs=1e-7)

def test_tuco_decomposition_is_exact():
    m = lora_model()
    with torch.no_grad(), disabled_adapters(m): base_logits = m(input_ids=IDS).logits
    with torch.no_grad(): tuned_logits = m(input_ids=IDS).logits
    torch.testing.assert_close(steered_logits(m, None, IDS, 0.0), base_logits, atol=1e-5, rtol=1e-5)   # α = 0: the base
    torch.testing.assert_close(steered_logits(m, None, IDS, 1.0), tuned_logits, atol=1e-6, rtol=1e-6)  # α = 1: unchanged
    t = tuco(m, prompts=[[5, 6, 7], [8, 9]])
    assert ((t.tuco > 0) & (t.tuco < 1)).all() and len(t) == 2
    assert tuco(apply(tiny_llama(vocab_size=V), "lora", r=2), prompts=IDS).tuco.tolist() == [0.0] * 3   # B = 0: nothing tuned

@pytest.mark.parametrize("layer,module", [(0, "self_attn"), (0, "mlp"), (1, "self_attn"), (1, "mlp")])
def test_path_patching_finds_the_one_tuned_module(layer, module):
    base, tuned = one_module_tuned(layer, module)
    table = path_patching(base, tuned, batch=BATCH)
    assert table.loc[layer, module] == pytest.approx(1.0, abs=1e-4)          # it alone makes the base the tuned model
    order = [(l, m) for l in range(2) for m in ("self_attn", "mlp")]                # the order the forward runs them
    for l, m in order[:order.index((layer, module))]: assert table.loc[l, m] == pytest.approx(0.0, abs=1e-5)   # same function, same input: no change

def test_patching_every_component_recovers_all_of_a_lora():
    everything = [(l, m) for l in range(2) for m in ("self_attn", "mlp")]
    assert patch_recovery(lora_model(), None, BATCH, everything) == pytest.approx(1.0, abs=1e-4)

SUBSTITUTIONS = [({1: 5, 5: 1}, [0, 1, 5, 9], [0, 5, 1, 9]),
                 ({1: 2, 2: 3, 3: 1}, [1, 2, 3, 4], [2, 3, 1, 4]),
                 ({7: 7}, [7, 8], [7, 8])]

@pytest.mark.parametrize("mapping,ids,want", SUBSTITUTIONS)
def test_substitution_round_trip(mapping, ids, want):
    T, T_inv = substitution(mapping)
    assert T(torch.tensor(ids)).tolist() == want and T_inv(T(torch.tensor(ids))).tolist() == ids

def test_conjugate_prompt_reads_the_answer_back():
    "A model that always predicts token 6 answers [5] right in the conjugate alphabet (6 maps back to 2) and [1] wrong."
    class Constant(nn.Module):
        def __init__(self): super().__init__(); self.w = nn.Parameter(torch.zeros(8))
        def forward(self, input_ids, **kw):
            return type("Out", (), dict(logits=torch.nn.functional.one_hot(torch.full_like(input_ids, 6), 8).float() + self.w))
    T, T_inv = substitution({1: 5, 5: 1, 2: 6, 6: 2})
    tab = conjugate_prompting(Constant(), [[1]], [[2]], T, T_inv)
    assert tab.loc["model", ("plain", "token_accuracy")] == 0.0 and tab.loc["model", ("conjugate", "token_accuracy")] == 1.0

T_SWAP = substitution({1: 5, 5: 1})
BAD_INPUT = [
    (lambda: tuco(tiny_llama(vocab_size=V), prompts=[[1]]), "the model has no adapter"),
    (lambda: tuco(tiny_llama(vocab_size=V), tiny_llama(vocab_size=V, hidden_size=32), prompts=[[1]]), "the two must have the same architecture and sizes"),
    (lambda: tuco(lora_model(), prompts=[]), "no prompts given"),
    (lambda: tuco(lora_model(), prompts=[[1, 2], []]), "prompt 1 is empty"),
    (lambda: tuco(lora_model(), prompts=["text"]), "must be token ids, not text"),
    (lambda: tuco(lora_model(), prompts=[[1]], norm=3), "norm"),
    (lambda: path_patching(tiny_llama(vocab_size=V), tiny_llama(vocab_size=V), batch=BATCH), "there is no gain for patching to recover"),
    (lambda: path_patching(lora_model(), batch=dict(input_ids=IDS, labels=torch.full_like(IDS, -100))), "no answer tokens"),
    (lambda: path_patching(lora_model(), batch=dict(input_ids=IDS[:0], labels=IDS[:0])), "give at least one row"),
    (lambda: path_patching(lora_model(), batch=BATCH, modules=("attn",)), "has no sub-module 'attn'"),
    (lambda: path_patching(tiny_llama(vocab_size=V), tiny_llama(vocab_size=V, num_hidden_layers=3), batch=BATCH), "the two must have the same architecture"),
    (lambda: substitution({1: 5}), "not one-to-one"),
    (lambda: conjugate_prompting(lora_model(), [[1], [2]], [[1]], *T_SWAP), "1 answers for 2 prompts"),
    (lambda: conjugate_prompting(lora_model(), [[1]], [[]], *T_SWAP), "answer 0 is empty"),
]

@pytest.mark.parametrize("call,message", BAD_INPUT)
def test_bad_input_is_named(call, message):
    with pytest.raises((ValueError, TypeError), match=None) as e: call()
    assert message in str(e.value)

def test_registered_with_their_papers():
    table = methods("analysis").set_index("name")
    assert table.loc["tuco", "paper"] == "TuCo: Measuring the Contribution of Fine-Tuning to Individual Responses of LLMs"
    assert table.loc["path-patching", "paper"] == "Fine-Tuning Enhances Existing Mechanisms: A Case Study on Entity Tracking"
    assert table.loc["conjugate-prompting", "paper"] == "Understanding Catastrophic Forgetting in Language Models via Implicit Inference"
