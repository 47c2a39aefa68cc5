"AMFT, FAFT and PPO (objectives.rl_mixes): PPO's clipped policy loss against TRL's own `GRPOTrainer._compute_loss` with per-token advantages (TRL 1.16 has no PPO trainer, so GAE is checked against the classic per-row loop and hand-computed cases), FAFT's liked-only loss against the model's own cross-entropy, AMFT's meta-gradient against autograd through the look-ahead, and the objectives on rollout_fit (mixing weight logged and resumed, value head trained)."
import math, tempfile
import pytest, torch
import peftlab as pl
from peftlab.core.models import tiny_llama, load_tokenizer
from peftlab.core.data import get_task, sft_loader, collate, encode_example
from peftlab.core.train import make_objective
from peftlab.objectives.core import rollout_fit, token_logprobs
from peftlab.objectives.dpo import CompactTokenizer
from peftlab.objectives.rl_mixes import (AMFT, AMFTConfig, amft_meta_gradient, feedback_batch, gae, whiten, kl_shaped_rewards,
                                         ppo_policy_loss, ppo_value_loss, label_match)
from test_dpo_grpo_trl import trl_grpo_loss          # TRL's `_compute_loss`, driven without a training run

TOL = dict(atol=1e-6, rtol=1e-6)

# --- PPO's clipped policy loss: TRL's GRPO loss takes per-token (B, T) advantages, and with beta 0 and "bnpo" it is PPO's
@pytest.mark.parametrize("epsilon", [0.1, 0.2, 0.3])
@pytest.mark.parametrize("seed", [0, 1])
def test_ppo_policy_loss_equals_trl(epsilon, seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 7
    mask = (torch.arange(T)[None] < torch.randint(1, T + 1, (B, 1), generator=g)).long()
    logps = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    old = logps + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)         # ratios well outside 1 ± ε: the clip binds
    adv, _ = gae(torch.randn(B, T, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g, dtype=torch.float64), mask, 1.0, 0.95)
    adv = whiten(adv, mask)
    theirs = trl_grpo_loss(logps, old, None, adv, mask, "bnpo", 0.0, epsilon, epsilon, None, T)
    torch.testing.assert_close(ppo_policy_loss(logps, old, adv, mask, epsilon), theirs, **TOL)

# --- GAE: the classic loop (one row at a time over its completion, as the RLHF libraries' PPO trainers wrote it) -----
def gae_by_row(rewards, values, mask, gamma, lam):
    adv = torch.zeros_like(values)
    for b in range(len(values)):
        idx = mask[b].nonzero().squeeze(-1).tolist()
        lastgaelam = 0.0
        for k in reversed(range(len(idx))):
            t = idx[k]
            nextvalues = values[b, idx[k + 1]] if k + 1 < len(idx) else 0.0
            delta = rewards[b, t] + gamma * nextvalues - values[b, t]
            lastgaelam = delta + gamma * lam * lastgaelam
            adv[b, t] = lastgaelam
    return adv, (adv + values) * mask

@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0), (1.0, 1.0)])
def test_gae_equals_the_per_row_loop(gamma, lam):
    g = torch.Generator().manual_seed(int(gamma * 100 + lam * 10))
    B, T = 5, 9
    start, length = torch.randint(0, 4, (B, 1), generator=g), torch.randint(1, 6, (B, 1), generator=g)
    pos = torch.arange(T)[None]
    mask = ((pos >= start) & (pos < start + length)).long()                        # prompt before, padding after
    rewards, values = torch.randn(B, T, generator=g, dtype=torch.float64) * mask, torch.randn(B, T, generator=g, dtype=torch.float64)
    adv, ret = gae(rewards, values * mask, mask, gamma, lam)
    want_adv, want_ret = gae_by_row(rewards, values * mask, mask, gamma, lam)
    torch.testing.assert_close(adv, want_adv, **TOL); torch.testing.assert_close(ret, want_ret, **TOL)

GAE_CASES = [  # rewards, values, mask, gamma, lam -> advantages (computed by hand)
    ([[0, 0, 1.0]], [[0.5, 0.2, 0.4]], [[1, 1, 1]], 1.0, 0.5, [[-0.05, 0.5, 0.6]]),
    ([[1.0, 0, 1.0]], [[0, 0, 0.0]], [[1, 1, 1]], 0.9, 1.0, [[1.81, 0.9, 1.0]]),
    ([[0, 2.0, 0]], [[0, 1.0, 0]], [[0, 1, 0]], 1.0, 0.95, [[0, 1.0, 0]]),                      # one token: A = r - V
    ([[0, 0, 1.0]], [[0.5, 0.2, 0.4]], [[1, 1, 1]], 1.0, 0.0, [[-0.3, 0.2, 0.6]]),               # λ = 0: the one-step TD errors
]

@pytest.mark.parametrize("rewards,values,mask,gamma,lam,want", GAE_CASES)
def test_gae_hand_computed(rewards, values, mask, gamma, lam, want):
    adv, _ = gae(torch.tensor(rewards), torch.tensor(values), torch.tensor(mask), gamma, lam)
    torch.testing.assert_close(adv, torch.tensor(want), **TOL)

def test_kl_shaping_and_value_loss_by_hand():
    lp, ref, mask = torch.tensor([[-1.0, -0.5, -2.0]]), torch.tensor([[-1.0, -0.7, -1.0]]), torch.tensor([[0, 1, 1]])
    torch.testing.assert_close(kl_shaped_rewards(torch.tensor([2.0]), lp, ref, mask, 0.5), torch.tensor([[0.0, -0.1, 2.5]]))
    torch.testing.assert_close(ppo_value_loss(torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[0.0]]), torch.ones(1, 1), 0.2),
                               torch.tensor(0.5))        # unclipped error 1 beats the clipped 0.2
    assert label_match(["yes", " Yes.", "no"], [dict(answer="yes")] * 3) == [1.0, 1.0, 0.0]

# --- AMFT's meta-gradient against autograd through the look-ahead, on a small linear model ------------------------------
def test_amft_meta_gradient_is_the_lookahead_derivative():
    torch.manual_seed(0)
    w = torch.randn(3, 4, dtype=torch.float64)
    x_s, x_r, x_v = (torch.randn(5, 4, dtype=torch.float64) for _ in range(3))
    y_s, y_r, y_v = (torch.randn(5, 3, dtype=torch.float64) for _ in range(3))
    loss = lambda w, x, y: ((x @ w.T - y) ** 2).mean()
    g = lambda x, y: torch.autograd.grad(loss(w.requires_grad_(), x, y), w)[0]
    g_sft, g_rl, alpha = g(x_s, y_s), g(x_r, y_r), 0.005
    mu = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    exact, = torch.autograd.grad(loss(w.detach() - alpha * (mu * g_sft + (1 - mu) * g_rl), x_v, y_v), mu)
    w_next = (w.detach() - alpha * (0.3 * g_sft + 0.7 * g_rl)).requires_grad_()
    at_next = torch.autograd.grad(loss(w_next, x_v, y_v), w_next)[0]
    assert math.isclose(amft_meta_gradient([at_next], [g_sft], [g_rl], alpha), exact.item(), rel_tol=1e-9)     # exact at θ'
    first_order = amft_meta_gradient([g(x_v, y_v)], [g_sft], [g_rl], alpha)                                      # what AMFT uses: at θ
    assert abs(first_order - exact.item()) < 0.05 * abs(exact.item()) + 1e-9

# --- the objectives in the loop --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world():
    task = get_task("arithmetic", n_train=12, n_test=4, seed=0, digits=1)
    ctok = CompactTokenizer(load_tokenizer("tiny-llama"), task.train + task.test)
    return task, ctok

def lora(ctok):
    torch.manual_seed(0); return pl.apply(tiny_llama(**ctok.model_config()), "lora", r=4)

def test_faft_liked_only_is_the_models_cross_entropy(world):
    task, ctok = world
    m = lora(ctok)
    fb = feedback_batch([dict(e, feedback=1) for e in task.train[:4]], ctok)
    out = m(input_ids=fb["input_ids"], attention_mask=fb["attention_mask"], labels=fb["labels"])
    s, n = make_objective(m, "faft", negative_weight=0.0)(out.logits, fb["labels"], dict(fb))
    torch.testing.assert_close(s / n, out.loss, atol=1e-5, rtol=1e-5)
    fb["feedback"] = torch.tensor([1.0, 1.0, 0.5, -1.0])
    with pytest.raises(ValueError, match="not ratings"): make_objective(m, "faft")(out.logits, fb["labels"], dict(fb))

def test_amft_logs_and_resumes_its_mixing_weight(world):
    task, ctok = world
    demos = list(sft_loader(task.train, ctok, batch_size=4, seed=0))
    val = collate([encode_example(e, ctok) for e in task.test], ctok.pad_token_id)
    def run(steps, **kw):
        m = lora(ctok); obj = AMFT(m, AMFTConfig(meta_lr=100.0), demos=demos, validation=val)
        log = rollout_fit(m, ctok, task.train, steps, obj, rewards=["arithmetic"], num_generations=2, prompts_per_step=2,
                          max_new_tokens=3, lr=1e-2, warmup=0, progress=False, **kw)
        return [r["mixing_weight"] for r in log.rows if "mixing_weight" in r], obj
    with tempfile.TemporaryDirectory() as d:
        straight, obj = run(2)
        run(1, checkpoint_dir=d, checkpoint_every=1)
        resumed, obj2 = run(2, checkpoint_dir=d, resume=True)
    assert len(straight) == 2 and straight[0] == 0.5 and straight[-1] != 0.5
    assert obj2.history == obj.history and resumed[-1] == straight[-1]

def test_ppo_trains_its_value_head_and_refuses_a_model_without_reference(world):
    task, ctok = world
    m = lora(ctok)
    def always(completions, examples): return [1.0] * len(completions)     # returns of 1: the zero-initialised head must move
    log = rollout_fit(m, ctok, task.train, 2, "ppo", rewards=[always], num_generations=2, prompts_per_step=2,
                      max_new_tokens=3, iterations=2, lr=1e-2, warmup=0, progress=False)
    assert m.value_head.weight.abs().sum() > 0 and {"policy_loss", "value_loss"} <= set(log.rows[-1]) | set(log.rows[-2])
    plain = tiny_llama(**ctok.model_config()).requires_grad_(True)
    with pytest.raises(ValueError, match="no reference policy is available"):
        rollout_fit(plain, ctok, task.train, 1, "ppo", rewards=[label_match], max_new_tokens=3, progress=False)
