"Objectives' shared parts against TRL (log-probs, DFT, packing), and the errors the issue asks for: a failing reward function, a batch without an objective's fields, no reference policy."
import random
import pytest, torch
import torch.nn.functional as F
import peftlab as pl
from peftlab.core.models import tiny_llama, load_tokenizer
from peftlab.core.data import get_task, encode_example, collate
from peftlab.core.registry import NOT_APPLIED, apply, method_config
from peftlab.core.train import fit, make_objective, _pad_id
from peftlab.objectives.core import (Objective, token_logprobs, sequence_logprobs, reference_logprobs, policy_logprobs,
                                     sample, score, rollout_fit)
from peftlab.objectives.dft import dft_loss, DFT
from peftlab.objectives.packing import pack_examples, collate_packed, segment_losses

@pytest.fixture(scope="module")
def tok(): return load_tokenizer("tiny-llama")

@pytest.fixture(scope="module")
def batch(tok):
    return collate([encode_example(e, tok) for e in get_task("sort_numbers", n_train=4, n_test=1, seed=0).train], _pad_id(tok))

def test_sequence_logprobs_equal_trl(batch):
    "DPOTrainer's log-probs: selective_log_softmax of the shifted logits, masked, summed (and GRPO's, at a temperature)."
    from trl.trainer.utils import selective_log_softmax
    logits = tiny_llama()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach()
    mask = (batch["labels"] != -100).long()
    theirs = (selective_log_softmax(logits[:, :-1], batch["input_ids"][:, 1:]) * mask[:, 1:]).sum(1)
    torch.testing.assert_close(sequence_logprobs(logits, batch["input_ids"], mask), theirs, atol=1e-5, rtol=1e-5)
    hot = selective_log_softmax(logits[:, :-1], batch["input_ids"][:, 1:], temperature=0.7) * mask[:, 1:]
    torch.testing.assert_close(token_logprobs(logits, batch["input_ids"], mask, temperature=0.7), hot, atol=1e-5, rtol=1e-5)

def test_dft_equals_trl_formula(batch):
    "TRL's SFTTrainer(loss_type='dft'): -logp * exp(logp).detach(), summed over supervised tokens / their count; and its gradient."
    torch.manual_seed(0)
    logits = tiny_llama()(input_ids=batch["input_ids"]).logits.detach().requires_grad_(True)
    labels = batch["labels"]
    lp = torch.gather(logits[:, :-1].log_softmax(-1), -1, labels[:, 1:].clamp_min(0)[..., None]).squeeze(-1)
    mask = labels[:, 1:] != -100
    theirs = ((-lp * lp.exp().detach()) * mask).sum() / mask.sum()
    s, n = dft_loss(logits, labels)
    torch.testing.assert_close(s / n, theirs, atol=1e-5, rtol=1e-5)
    g1, = torch.autograd.grad(s / n, logits); g2, = torch.autograd.grad(theirs, logits)
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)

def test_objective_by_name(batch):
    m = pl.apply(tiny_llama(), "lora", r=2)
    assert isinstance(make_objective(m, "dft", power=0.5), DFT)
    log = fit(m, [batch], 2, objective="dft", objective_options=dict(power=0.5), progress=False)
    assert len(log.losses) == 2
    with pytest.raises(ValueError, match="power"): method_config("dft", dict(power=-1))
    with pytest.raises(ValueError, match="fit\\(objective='dft'"): apply(tiny_llama(), "dft")
    with pytest.raises(ValueError, match="not an objective"): make_objective(m, "lora")
    assert "objective" in NOT_APPLIED

def test_packing_matches_trl_bfd():
    "pack_examples makes the rows TRL's pack_dataset(strategy='bfd') makes, token for token."
    from datasets import Dataset
    from trl.data_utils import pack_dataset
    rng = random.Random(0)
    enc = [dict(input_ids=list(range(i * 100, i * 100 + n)), labels=list(range(n))) for i, n in enumerate(rng.randint(3, 40) for _ in range(60))]
    theirs = pack_dataset(Dataset.from_dict(dict(input_ids=[e["input_ids"] for e in enc])), 64, strategy="bfd")
    ours = pack_examples(enc, 64)
    assert sorted(map(tuple, theirs["input_ids"])) == sorted(tuple(r["input_ids"]) for r in ours)
    assert sorted(map(tuple, theirs["seq_lengths"])) == sorted(tuple(r["seq_lengths"]) for r in ours)

@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("mask", ["positions", "4d"])
def test_packed_losses_equal_alone(tok, attn, mask):
    "Each example's loss in a packed batch equals its loss alone (1e-5), and its gradient contribution too."
    exs = get_task("iso_date", n_train=5, n_test=1, seed=1).train + get_task("reverse_words", n_train=5, n_test=1, seed=1).train
    enc = [encode_example(e, tok) for e in exs]
    rows = pack_examples(enc, 120)
    assert max(len(r["seq_lengths"]) for r in rows) >= 2
    model = tiny_llama(attn_implementation=attn)
    by_tokens = {tuple(e["input_ids"]): e for e in enc}
    order = []
    for r in rows:
        start = 0
        for n in r["seq_lengths"]:
            order.append(by_tokens[tuple(r["input_ids"][start:start + n])]); start += n
    with torch.no_grad():
        single = [F.cross_entropy(model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits[0, :-1],
                                  torch.tensor(e["labels"][1:]), ignore_index=-100).item() for e in order]
        packed = segment_losses(model, collate_packed(rows, _pad_id(tok), mask=mask))
    assert max(abs(a - b) for a, b in zip(packed, single)) < 1e-5
    padded, packed_batch = collate(enc, _pad_id(tok)), collate_packed(rows, _pad_id(tok), mask=mask)
    grads = []
    for b in (padded, packed_batch):
        m = pl.apply(tiny_llama(attn_implementation=attn), "lora", r=2)
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad: p.fill_(0.01)
        inputs = {k: v for k, v in b.items() if k != "labels"}
        logits = m(**inputs).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=-100).backward()
        grads.append([p.grad for p in m.parameters() if p.requires_grad])
    for g1, g2 in zip(*grads): torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-4)

def test_sampling_is_seeded_and_leaves_the_rng(tok):
    exs = get_task("arithmetic", n_train=2, n_test=1, seed=0).train
    torch.manual_seed(5); before = torch.rand(1)
    torch.manual_seed(5)
    a = sample(tiny_llama(), tok, exs, n=2, max_new_tokens=5, temperature=0.8, top_p=0.95, seed=3)
    assert torch.equal(torch.rand(1), before)     # the caller's generator is untouched
    b = sample(tiny_llama(), tok, exs, n=2, max_new_tokens=5, temperature=0.8, top_p=0.95, seed=3)
    assert torch.equal(a.input_ids, b.input_ids) and a.texts == b.texts

def test_failing_reward_names_the_sample(tok):
    def picky(completions, examples):
        return [float(e["answer"] == c) if "answer" in e else e["missing"] for c, e in zip(completions, examples)]
    with pytest.raises(ValueError, match=r"reward function 'picky' failed on sample 1 \(prompt 'q1'"):
        score([picky], ["a", "b"], [dict(prompt="q0", answer="a"), dict(prompt="q1")])
    m = pl.apply(tiny_llama(), "lora", r=2)
    exs = [dict(prompt="What is 1 + 1?")]                      # no answer: the task reward cannot check it
    class Toy(Objective):
        needs, rollout = ("rewards", "group"), True
        def loss(self, logits, labels, batch): return logits.sum() * 0, 1
    with pytest.raises(ValueError, match="has no 'answer'"):
        rollout_fit(m, tok, exs, 1, Toy(m), rewards=["arithmetic"], num_generations=2, prompts_per_step=1, max_new_tokens=3, progress=False)

def test_missing_fields_and_reference(tok, batch):
    class NeedsRef(Objective):
        name, needs, reference = "needs-ref", ("completion_mask",), True
        def loss(self, logits, labels, batch): return (sequence_logprobs(logits, batch["input_ids"], batch["completion_mask"]) - batch["ref_logps"].sum(1)).mean()
    plain = tiny_llama().requires_grad_(True)
    with pytest.raises(ValueError, match=r"needs batch field\(s\) \['completion_mask'\]"):
        fit(plain, [batch], 1, objective=NeedsRef(plain), progress=False)
    with_mask = dict(batch, completion_mask=(batch["labels"] != -100).long())
    with pytest.raises(ValueError, match="no reference policy is available"):
        fit(plain, [with_mask], 1, objective=NeedsRef(plain), progress=False)
    m = pl.apply(tiny_llama(), "lora", r=2)                    # LoRA starts at zero: policy == reference
    torch.testing.assert_close(reference_logprobs(m, with_mask), policy_logprobs(m, with_mask), atol=1e-6, rtol=1e-6)
    log = fit(m, [with_mask], 1, objective=NeedsRef(m), progress=False)
    assert abs(log.losses[0]) < 1e-4                          # the log-ratio is 0 at the start
