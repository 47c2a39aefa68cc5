"Cross-checks of the SFT variants, RAFT, EFT, weak-to-strong and EWC against hand-written references, and their refusals."
import math
import pytest
import torch
import torch.nn.functional as F
import peftlab as pl
from peftlab.core.models import tiny_llama
from peftlab.core.train import make_objective
from peftlab.objectives.sft_variants import asft_loss, fdiv_sft_loss, ift_weights, ift_loss, mask_answer_tokens, FDIVERGENCES
from peftlab.objectives.raft import raft_select
from peftlab.objectives.eft import eft_logprobs
from peftlab.objectives.weak_to_strong import logconf_loss, confidence_coef
from peftlab.objectives.ewc import consolidate, ewc_penalty

def random_case(seed, B=3, T=7, V=11):
    g = torch.Generator().manual_seed(seed)
    logits, ref = torch.randn(B, T, V, generator=g, dtype=torch.float64), torch.randn(B, T, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :2] = -100; labels[0, -2:] = -100
    return logits, ref, labels

def shifted(logits, labels):
    "The causal shift as the authors' codes write it: logits at t predict labels at t+1, flattened."
    return logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_asft_matches_the_authors_formula(seed, direction):
    "CE * sg(p) + λ KL, summed over valid tokens, as ASFT's code (and unsloth's port) write it with F.kl_div."
    logits, ref, labels = random_case(seed)
    lg, y = shifted(logits, labels)
    rl, _ = shifted(ref, labels)
    valid = y != -100
    ce = F.cross_entropy(lg, y.clamp_min(0), reduction="none")
    weight = torch.exp(-ce).detach()
    kl = (F.kl_div(lg.log_softmax(-1), rl.softmax(-1), reduction="none") if direction == "forward"
          else F.kl_div(rl.log_softmax(-1), lg.softmax(-1), reduction="none")).sum(-1)
    theirs = ((ce * weight + 0.1 * kl)[valid]).sum() / valid.sum()
    s, n = asft_loss(logits, labels, ref, 0.1, direction)
    assert n == int(valid.sum()) and abs((s / n).item() - theirs.item()) < 1e-6

CONJUGATES = {  # f -> (T(u), f*(t)) written from the f-GAN table, on probabilities
    "kl": (lambda u: math.log(u) + 1, lambda t: math.exp(t - 1)),
    "pearson": (lambda u: 2 * (u - 1), lambda t: t * t / 4 + t),
    "hellinger": (lambda u: 1 - u ** -0.5, lambda t: t / (1 - t)),
    "js": (lambda u: math.log(2 * u / (1 + u)), lambda t: -math.log(2 - math.exp(t))),
}

@pytest.mark.parametrize("divergence", sorted(FDIVERGENCES))
def test_fdiv_sft_is_the_negative_variational_bound(divergence):
    "Σ_t [-T(u_y) + Σ_v q_v f*(T(u_v))], u = p/q, with T and f* from the f-GAN table (not from the module's closed forms)."
    logits, ref, labels = random_case(3)
    T, conj = CONJUGATES[divergence]
    total = 0.0
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if labels[b, t] == -100: continue
            p, q = logits[b, t - 1].softmax(-1).tolist(), ref[b, t - 1].softmax(-1).tolist()
            y = int(labels[b, t])
            total += -T(p[y] / q[y]) + sum(qv * conj(T(pv / qv)) for pv, qv in zip(p, q))
    assert abs(fdiv_sft_loss(logits, labels, ref, divergence)[0].item() - total) < 1e-6

def discounted_suffix_sum(x, gamma):
    "y_t = Σ_{k≥t} γ^(k-t) x_k, by the recursion y_t = x_t + γ y_{t+1} (what torch_discounted_cumsum's right sum computes)."
    y, acc = torch.zeros_like(x), torch.zeros_like(x[:, 0])
    for t in reversed(range(x.shape[1])):
        acc = x[:, t] + gamma * acc; y[:, t] = acc
    return y

@pytest.mark.parametrize("gamma", [0.5, 0.95, 1.0])
def test_ift_weights_match_the_authors_propagation(gamma):
    "IFT's get_cumsum_weight with propagation type 'loss', side 'left', norm 'L1', rewritten as a loop."
    logits, _, labels = random_case(4)
    mask = labels[:, 1:] != -100
    logps = -torch.rand(mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * mask
    item = (-logps / mask.sum(-1, keepdim=True)) * mask
    w = discounted_suffix_sum(item, gamma) * mask
    w = w * mask.sum(-1, keepdim=True) / w.sum(-1, keepdim=True)
    assert torch.allclose(ift_weights(logps, mask, gamma), w, atol=1e-12)

def test_ift_loss_is_the_weighted_row_mean():
    logits, _, labels = random_case(6)
    mask = labels[:, 1:] != -100
    lg, y = shifted(logits, labels)
    logps = -F.cross_entropy(lg, y.clamp_min(0), reduction="none").view(mask.shape) * mask
    w = ift_weights(logps, mask, 0.9)
    assert abs(ift_loss(logits, labels, 0.9).item() - ((-logps * w).sum(-1) / mask.sum(-1)).mean().item()) < 1e-6

def test_masked_thought_masks_only_answer_inputs():
    ids = torch.randint(5, 50, (200, 30), generator=torch.Generator().manual_seed(0))
    labels = ids.masked_fill(torch.arange(30) < 12, -100)
    masked = mask_answer_tokens(ids, labels, 0.3, 1, torch.Generator().manual_seed(1))
    assert torch.equal(masked[:, :12], ids[:, :12]) and set(masked[masked != ids].tolist()) <= {1}
    assert abs((masked[:, 12:] == 1).float().mean().item() - 0.3) < 0.02

def test_raft_selection_matches_sorting_each_group():
    g = torch.Generator().manual_seed(0)
    rewards, group = torch.randint(0, 4, (24,), generator=g).float(), torch.arange(6).repeat_interleave(4)
    for keep in (1, 2):
        want = torch.zeros(24, dtype=torch.bool)
        for p in range(6):
            rows = sorted(range(4 * p, 4 * p + 4), key=lambda i: (-rewards[i].item(), i))[:keep]
            want[rows] = True
        assert torch.equal(raft_select(rewards, group, keep), want)

def test_eft_is_the_renormalised_product():
    g = torch.Generator().manual_seed(0)
    L, Ft, B = (torch.randn(4, 9, generator=g, dtype=torch.float64) for _ in range(3))
    for beta in (0.5, 1.0, 1.5):
        unnorm = L.softmax(-1) * (Ft.softmax(-1) / B.softmax(-1)) ** beta
        assert torch.allclose(eft_logprobs(L, Ft, B, beta).exp(), unnorm / unnorm.sum(-1, keepdim=True), atol=1e-12)

def authors_logconf(logits, labels, step_frac, aux_coef=0.5, warmup_frac=0.1):
    "openai/weak-to-strong's logconf_loss_fn, transcribed."
    coef = aux_coef * (1.0 if step_frac > warmup_frac else step_frac)
    preds = torch.softmax(logits, dim=-1)
    threshold = torch.quantile(preds[:, 0], labels.mean(dim=0)[1])
    strong = torch.cat([(preds[:, 0] >= threshold)[:, None], (preds[:, 0] < threshold)[:, None]], dim=1).to(labels.dtype)
    target = labels * (1 - coef) + strong.detach() * coef
    return F.cross_entropy(logits, target, reduction="none").mean()

@pytest.mark.parametrize("step_frac", [0.02, 0.5])
def test_logconf_matches_the_authors_code(step_frac):
    g = torch.Generator().manual_seed(1)
    logits, weak = torch.randn(16, 2, generator=g, dtype=torch.float64), torch.rand(16, generator=g, dtype=torch.float64)
    weak = torch.stack([1 - weak, weak], 1)
    ours = logconf_loss(logits, weak, confidence_coef(step_frac))
    assert abs(ours.item() - authors_logconf(logits, weak, step_frac).item()) < 1e-6

def test_ewc_penalty_by_hand():
    m = pl.apply(tiny_llama(vocab_size=16), "lora", r=2, targets=["q_proj"])
    ids = torch.randint(3, 16, (2, 6), generator=torch.Generator().manual_seed(0))
    state = consolidate(m, [dict(input_ids=ids[i:i + 1], labels=ids[i:i + 1]) for i in range(2)])
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad: p.add_(0.3)
    want = sum((state["fisher"][k] * 0.09).sum() for k in state["fisher"])
    assert abs(ewc_penalty(m, state["fisher"], state["anchor"]).item() - want.item()) < 1e-5 * max(1.0, want.item())

def lora_model():
    torch.manual_seed(0)
    return pl.apply(tiny_llama(vocab_size=24), "lora", r=2, targets=["q_proj"])

def sft_batch():
    ids = torch.randint(3, 24, (2, 8), generator=torch.Generator().manual_seed(0))
    return dict(input_ids=ids, labels=ids.masked_fill(torch.arange(8) < 4, -100))

REFUSALS = [  # (what, model, objective, options, message)
    ("raft without rollouts", lora_model, "raft", {}, "needs batch field(s) ['completion_mask', 'rewards', 'group']"),
    ("weak-to-strong without weak labels", lora_model, "weak-to-strong", dict(label_token_ids=(3, 4)), "needs batch field(s) ['weak_labels']"),
    ("asft without a reference", lambda: tiny_llama(vocab_size=24).requires_grad_(True), "asft", {}, "no reference policy is available"),
    ("fdiv-sft without a reference", lambda: tiny_llama(vocab_size=24).requires_grad_(True), "fdiv-sft", {}, "no reference policy is available"),
    ("ewc without consolidate", lora_model, "ewc", {}, "call peftlab.objectives.ewc.consolidate(model"),
    ("masked-thought without a mask token", lambda: tiny_llama(vocab_size=24, pad_token_id=None).requires_grad_(True), "masked-thought", {}, "mask_token_id"),
]

@pytest.mark.parametrize("what,model,objective,options,message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_name_what_is_missing(what, model, objective, options, message):
    with pytest.raises(ValueError, match=None) as e:
        pl.fit(model(), [sft_batch()], 1, objective=objective, objective_options=options or None, progress=False)
    assert message in str(e.value)

@pytest.mark.parametrize("name", ["asft", "ift", "masked-thought", "fdiv-sft", "raft", "weak-to-strong", "ewc"])
def test_registered_as_objectives(name):
    assert pl.methods("objective").set_index("name").loc[name, "paper"]

@pytest.mark.parametrize("name", ["ift", "masked-thought"])
def test_second_pass_objectives_refuse_data_parallel(name, monkeypatch):
    "Their own forward pass goes around DDP's wrapper: under torchrun they refuse, naming the fix."
    m, b = lora_model(), sft_batch()
    logits = m(input_ids=b["input_ids"]).logits
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="train it in one process"):
        make_objective(m, name)(logits, b["labels"], dict(b))
