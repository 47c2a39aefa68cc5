"""QAlign's chain targets p(y|x)·exp(r(y)/β): many chains on one prompt, compared with the tilted distribution computed exactly
by enumerating every completion of a tiny model (at most two new tokens)."""
import itertools, math
import torch
from peftlab.core.models import tiny_llama
from peftlab.objectives.reward_decoding import qalign

V, PAD, EOS, PROMPT = 6, 0, 1, [2, 3, 4]

class StubTokenizer:
    "Ids as they are: the prompt is fixed, a completion decodes to its ids joined by spaces (end token dropped)."
    eos_token_id, pad_token_id = EOS, PAD
    def apply_chat_template(self, messages, **kwargs): return list(PROMPT)
    def decode(self, ids, skip_special_tokens=True): return " ".join(str(int(i)) for i in ids if int(i) != EOS)

def exact_completions(model, max_new_tokens=2)->dict:
    "Every completion of at most two tokens (stopping at the end token) and its probability under `model` at temperature 1."
    with torch.no_grad():
        first = model(torch.tensor([PROMPT])).logits[0, -1].log_softmax(-1)
        second = model(torch.tensor([PROMPT + [a] for a in range(V)])).logits[:, -1].log_softmax(-1)   # (V, V)
    out = {(EOS,): first[EOS].exp().item()}
    for a, b in itertools.product(range(V), range(V)):
        if a != EOS: out[(a, b)] = (first[a] + second[a, b]).exp().item()
    return out

def reward(completions, examples): return [float(c.split(" ")[0] == "3") if c else 0.0 for c in completions]

def test_qalign_chains_reach_the_tilted_distribution():
    model = tiny_llama(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=EOS, seed=3)
    p = exact_completions(model)
    assert abs(sum(p.values()) - 1) < 1e-5
    beta = 0.5
    r = {y: float(y[0] == 3) for y in p}
    z = sum(q * math.exp(r[y] / beta) for y, q in p.items())
    target_mean = sum(q * math.exp(r[y] / beta) * r[y] for y, q in p.items()) / z     # E_pi[r]
    base_mean = sum(q * r[y] for y, q in p.items())                                   # E_p[r]
    chains = qalign(model, StubTokenizer(), [dict(prompt="x")] * 300, reward, seed=0, steps=40, max_new_tokens=2, beta=beta)
    late = torch.tensor([c.rewards[20:] for c in chains]).mean().item()               # states 20..40 of 300 chains (mixed by ~12)
    first = torch.tensor([c.rewards[0] for c in chains]).mean().item()                # the first states: samples of p
    assert target_mean - base_mean > 0.15, (target_mean, base_mean)                   # the tilt is large enough to see
    assert abs(first - base_mean) < 0.06, (first, base_mean)
    assert abs(late - target_mean) < 0.05, (late, target_mean, base_mean)
