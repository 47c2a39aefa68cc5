"DPO and GRPO against TRL 1.x's own code on the same numbers: every DPO loss type and its logs (`DPOTrainer._compute_loss`), sequence log-probs of a real model (`selective_log_softmax`, TRL's fused LM head), GRPO's advantages (the lines of `_generate_and_score_completions` that compute them) and every GRPO aggregation (`GRPOTrainer._compute_loss`)."
import collections, inspect, textwrap, types
import pytest, torch
import peftlab as pl
from trl.trainer import grpo_trainer
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.utils import add_fused_lm_head, selective_log_softmax
from peftlab.core.models import tiny_llama, load_tokenizer
from peftlab.core.data import get_task
from peftlab.core.train import make_objective
from peftlab.objectives.core import sequence_logprobs
from peftlab.objectives.dpo import DPO_LOSS_TYPES, dpo_loss, preference_batch, preference_pairs
from peftlab.objectives.grpo import GRPO_LOSS_TYPES, SCALE_REWARDS, aggregate_loss, group_advantages, grpo_token_loss

TOL = dict(atol=1e-6, rtol=1e-6)

# --- TRL's trainers without a training run ---------------------------------------------------------------------
# `_compute_loss` reads a handful of attributes; the trainers are made with `object.__new__` (no `__init__`, so no
# dataset, model loading or accelerate state) and given exactly those attributes. A one-process accelerator stub
# answers `gather`/`reduce` with the tensor itself, as accelerate does with one process.

class OneProcess:
    device, num_processes = torch.device("cpu"), 1
    def gather(self, x): return x
    gather_for_metrics = gather
    def reduce(self, x, reduction="sum"): return x

def metrics(): return {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}

class GivenLogProbs(torch.nn.Module):
    "Stands in for TRL's fused LM head (`model(..., labels, fused_lm_head=True)`): returns the given per-token log-probs."
    def __init__(self, per_token): super().__init__(); self.per_token = per_token
    def forward(self, input_ids=None, attention_mask=None, labels=None, fused_lm_head=True, use_cache=False):
        zero = torch.zeros_like(self.per_token)
        return types.SimpleNamespace(log_probs=self.per_token, entropy=zero, mean_logits=zero, is_top1=zero.bool())

def trl_dpo_trainer(model, loss_type, beta, label_smoothing, ref_model=None):
    t = object.__new__(DPOTrainer)
    t.__dict__.update(model=model, ref_model=ref_model, accelerator=OneProcess(), aux_loss_enabled=False, ld_alpha=None,
                      precompute_ref_logps=ref_model is None, f_divergence_type="reverse_kl", loss_types=[loss_type],
                      loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing, use_weighting=False, _total_train_tokens=0,
                      _tp_size=1, _metrics=metrics(), args=types.SimpleNamespace(discopop_tau=0.05, gradient_checkpointing_kwargs=None))
    return t

def random_pairs(P=6, T=10, seed=0):
    "Per-token log-probs of P chosen then P rejected rows, their completion mask (varied lengths), reference sums."
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * P, T, dtype=torch.long)
    for i, n in enumerate(torch.randint(1, T - 2, (2 * P,), generator=g)): mask[i, 2:2 + n] = 1
    per_token = -torch.rand(2 * P, T - 1, generator=g, dtype=torch.float64) * 3 * mask[:, 1:]
    ref = -torch.rand(2 * P, generator=g, dtype=torch.float64) * 8
    return per_token, mask, ref

SMOOTHED = ("robust", "exo_pair", "aot", "aot_unpaired")
DPO_CASES = [(lt, beta, 0.1 if lt in SMOOTHED else 0.0) for lt in DPO_LOSS_TYPES for beta in (0.1, 0.5)] + \
            [("robust", 0.1, 0.3), ("aot", 0.2, 0.0), ("sigmoid", 0.1, 0.2)]   # sigmoid ignores ε, as in TRL 1.x

@pytest.mark.parametrize("loss_type,beta,eps", DPO_CASES)
def test_dpo_loss_and_logs_equal_trl(loss_type, beta, eps):
    per_token, mask, ref = random_pairs(seed=DPO_CASES.index((loss_type, beta, eps)))
    P = len(ref) // 2
    t = trl_dpo_trainer(GivenLogProbs(per_token), loss_type, beta, eps)
    theirs = t._compute_loss(t.model, dict(input_ids=torch.zeros_like(mask), attention_mask=torch.ones_like(mask), completion_mask=mask,
                                           ref_chosen_logps=ref[:P], ref_rejected_logps=ref[P:]), False)
    logps, lengths = per_token.sum(1), mask.sum(1).double()
    ours, logs = dpo_loss(logps[:P], logps[P:], ref[:P], ref[P:], beta, loss_type, eps, lengths[:P], lengths[P:])
    torch.testing.assert_close(ours, theirs, **TOL)
    for k, v in logs.items(): assert abs(v - t._metrics["train"][k][-1]) < 1e-6, k

@pytest.fixture(scope="module")
def tiny_batch():
    tok = load_tokenizer("tiny-llama")
    return preference_batch(preference_pairs(get_task("arithmetic", n_train=4, n_test=1, seed=0).train), tok)

def test_sequence_logprobs_of_a_real_model_equal_trl(tiny_batch):
    b, m = tiny_batch, tiny_llama()
    with torch.no_grad(): logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    ours = sequence_logprobs(logits, b["input_ids"], b["completion_mask"])
    shifted = (selective_log_softmax(logits[:, :-1], b["input_ids"][:, 1:]) * b["completion_mask"][:, 1:]).sum(1)
    torch.testing.assert_close(ours, shifted, atol=1e-5, rtol=1e-5)
    add_fused_lm_head(m)   # what DPOTrainer computes with: log-probs of the labelled tokens only
    labels = b["input_ids"].masked_fill(b["completion_mask"] == 0, -100)
    with torch.no_grad(): fused = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels, fused_lm_head=True).log_probs
    torch.testing.assert_close(ours, fused.sum(1), atol=1e-5, rtol=1e-5)

@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "apo_zero"])
def test_dpo_objective_on_a_lora_model_equals_trl_with_the_base_as_ref_model(tiny_batch, loss_type):
    "Our objective (reference = the base under disabled adapters) vs TRL with the base loaded as its `ref_model`."
    b = tiny_batch
    torch.manual_seed(0)
    m = pl.apply(tiny_llama(), "lora", r=4)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad: p.add_(0.05 * torch.randn_like(p))
    s, n = make_objective(m, "dpo", beta=0.3, loss_type=loss_type)(m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"], dict(b))
    fields = ("log_probs", "entropy", "mean_logits", "is_top1")
    ref = tiny_llama(); add_fused_lm_head(ref, outputs=fields); add_fused_lm_head(m, outputs=fields)
    t = trl_dpo_trainer(m, loss_type, 0.3, 0.0, ref_model=ref)
    theirs = t._compute_loss(m, {k: b[k] for k in ("input_ids", "attention_mask", "completion_mask")}, False)
    torch.testing.assert_close(s / n, theirs, atol=1e-5, rtol=1e-5)

# --- GRPO -------------------------------------------------------------------------------------------------------
def trl_advantage_lines():
    "TRL's advantage computation, cut out of `_generate_and_score_completions` as written in the installed file."
    src = inspect.getsource(GRPOTrainer._generate_and_score_completions).splitlines()
    start = next(i for i, l in enumerate(src) if 'if self.multi_objective_aggregation == "sum_then_normalize":' in l)
    end = next(i for i, l in enumerate(src) if "advantages = torch.nan_to_num(advantages, nan=0.0)" in l)
    return compile(textwrap.dedent("\n".join(src[start:end + 1])), "trl/trainer/grpo_trainer.py (advantages)", "exec")

def trl_advantages(rewards, group_size, scale_rewards):
    me = types.SimpleNamespace(multi_objective_aggregation="sum_then_normalize", reward_weights=torch.ones(1), scale_rewards=scale_rewards)
    ns = dict(self=me, rewards_per_func=rewards[:, None], num_generations=group_size, device="cpu",
              unscorable_mask=rewards.isnan(), torch=torch, nanstd=grpo_trainer.nanstd)
    exec(trl_advantage_lines(), ns)
    return ns["advantages"]

REWARDS = dict(binary=torch.tensor([1., 0, 0, 0, 1, 1, 1, 1, 0, 1, 0, 1]),
               graded=torch.tensor([0.3, 2.0, -1.0, 0.5, 0.1, 0.1, 0.7, 0.2, 1.5, -0.4, 0.0, 0.9]),
               unscored=torch.tensor([1., float("nan"), 0, 0, float("nan"), float("nan"), 1, 0, 0.5, 0.5, 0.5, 0.5]))

@pytest.mark.parametrize("scale_rewards", SCALE_REWARDS)
@pytest.mark.parametrize("rewards", list(REWARDS))
@pytest.mark.parametrize("group_size", [2, 4, 6])
def test_grpo_advantages_equal_trl(rewards, scale_rewards, group_size):
    r = REWARDS[rewards]
    torch.testing.assert_close(group_advantages(r, group_size, scale_rewards), trl_advantages(r, group_size, scale_rewards), **TOL)

def trl_grpo_loss(logps, old, ref, advantages, mask, loss_type, beta, epsilon_low, epsilon_high, delta, max_completion_length):
    t = object.__new__(GRPOTrainer)
    t.__dict__.update(model=types.SimpleNamespace(training=True), accelerator=OneProcess(), top_entropy_quantile=1.0, aux_loss_enabled=False,
                      off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta, loss_type=loss_type,
                      epsilon_low=epsilon_low, epsilon_high=epsilon_high, use_vllm=False, vllm_importance_sampling_correction=False,
                      current_gradient_accumulation_steps=1, max_completion_length=max_completion_length, _entropy_bonus_enabled=False,
                      _metrics=metrics(), args=types.SimpleNamespace(use_bias_correction_kl=False, delta=delta, steps_per_generation=1))
    # the model's forward is replaced by the given per-token log-probs (TRL's own method would compute them from logits)
    t._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros_like(logps), None)
    B, T = mask.shape
    inputs = dict(prompt_ids=torch.zeros(B, 2, dtype=torch.long), prompt_mask=torch.ones(B, 2, dtype=torch.long),
                  completion_ids=torch.zeros(B, T, dtype=torch.long), completion_mask=mask, advantages=advantages,
                  old_per_token_logps=old, ref_per_token_logps=ref, num_items_in_batch=mask.sum())
    return t._compute_loss(None, inputs)

GRPO_CASES = [(lt, beta, eh, delta) for lt in GRPO_LOSS_TYPES for beta in (0.0, 0.04) for eh, delta in ((0.2, None), (0.28, None), (0.28, 1.5))]

@pytest.mark.parametrize("loss_type,beta,epsilon_high,delta", GRPO_CASES)
def test_grpo_loss_equals_trl(loss_type, beta, epsilon_high, delta):
    g = torch.Generator().manual_seed(len(loss_type) + int(beta * 100))
    B, T = 8, 7
    mask = (torch.arange(T)[None] < torch.randint(1, T + 1, (B, 1), generator=g)).long()
    logps = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    old, ref = logps + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64), logps + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    advantages = group_advantages(torch.randint(0, 2, (B,), generator=g).double(), 4)
    theirs = trl_grpo_loss(logps, old, ref, advantages, mask, loss_type, beta, 0.2, epsilon_high, delta, T + 3)
    ours = aggregate_loss(grpo_token_loss(logps, old, advantages, ref, beta, 0.2, epsilon_high, delta), mask, loss_type, T + 3)
    torch.testing.assert_close(ours, theirs, **TOL)
