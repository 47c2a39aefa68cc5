"InstructMining and CLEAR: hand-checked cases (a known linear rule recovered, CLEAR's decisions, a toy world CLEAR corrects) and bad input."
import json
from dataclasses import asdict
import pytest
import torch
from peftlab.core.models import tiny_llama, load_tokenizer
from peftlab.data.core import select, noisy_pool, example_losses
from peftlab.data.instruction_mining import fit_linear_rule, InstructionRule, INDICATORS, instruction_rule
from peftlab.data.clear import clear_actions, clear_curate
from peftlab.objectives.dpo import CompactTokenizer


@pytest.fixture(scope="module")
def world():
    "A noisy arithmetic pool of 8 and a tiny-llama over the tokens it uses (cheap to fine-tune)."
    pool = noisy_pool("arithmetic", 8, seed=0)
    tok = CompactTokenizer(load_tokenizer("tiny-llama"), pool)
    return pool, tiny_llama(**tok.model_config()), tok


# y = b + x . w on probes designed by hand: least squares with no ridge gives b and w back, R^2 = 1
@pytest.mark.parametrize("b,w", [(1.0, [2.0, -1.0]), (-0.5, [0.0, 3.0]), (2.0, [0.25, 0.25])])
def test_linear_rule_recovered(b, w):
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0]])
    got_b, got_w, r2 = fit_linear_rule(x, b + x @ torch.tensor(w))
    assert abs(got_b - b) < 1e-5 and torch.allclose(got_w, torch.tensor(w), atol=1e-5) and abs(r2 - 1) < 1e-9


def test_rule_reused_through_select(world):
    "A rule that weighs only the loss keeps the lowest-loss examples; it survives a JSON round trip."
    pool, lm, tok = world
    rule = InstructionRule(list(INDICATORS), [0.0] * 5, [1.0] * 5, 0.0, [0.0, 1.0, 0.0, 0.0, 0.0])
    again = json.loads(json.dumps(asdict(rule)))
    s = select(pool, "instruction-mining", 3, model=lm, tokenizer=tok, rule=again)
    assert s.indices == torch.argsort(example_losses(lm, pool, tok), stable=True)[:3].tolist()


def test_rule_fitted_is_seeded(world):
    pool, lm, tok = world
    fit = lambda: instruction_rule(pool, lm, pool[:2], tokenizer=tok, probes=3, probe_size=4, probe_steps=1)
    assert fit().weights == fit().weights


# (given confidence, own confidence, own answer is the given one) -> decision, at gamma 0.5 and eta 0.8
@pytest.mark.parametrize("given,own,same,act", [(0.9, 0.95, False, "keep"), (0.5, 0.0, False, "keep"), (0.2, 0.9, False, "correct"),
                                                (0.2, 0.7, False, "drop"), (0.2, 0.9, True, "drop")])
def test_clear_actions(given, own, same, act):
    assert clear_actions(torch.tensor([given]), torch.tensor([own]), [same], 0.5, 0.8) == [act]


def test_clear_corrects_a_toy_world():
    "Eight '2 + 2 = 4', one '2 + 2 = 5', eight colours: the model, warmed up on them, corrects the 5 to a 4."
    toy = [dict(prompt="What is 2 + 2?", answer="4")] * 8 + [dict(prompt="What is 2 + 2?", answer="5")] + [dict(prompt="Name a colour.", answer="blue")] * 8
    tok = CompactTokenizer(load_tokenizer("tiny-llama"), toy)
    out = clear_curate(toy, tiny_llama(**tok.model_config()), tok, warmup_steps=30, warmup_lr=1e-2, warmup_rank=0, warmup_batch=8, max_new_tokens=4)
    assert [e["corrected"] for e in out] == [False] * 8 + [True] + [False] * 8
    assert (out[8]["answer"], out[8]["given_answer"]) == ("4", "5")


@pytest.mark.parametrize("method,budget,options,message", [
    ("instruction-mining", 9, {}, "larger than the pool of 8 examples"),
    ("clear", 9, {}, "larger than the pool of 8 examples"),
    ("instruction-mining", 2, {}, "needs examples of the task to select for"),
    ("instruction-mining", 2, dict(probes=1), "probes=1 of method 'instruction-mining' must be >= 2"),
    ("clear", 2, dict(filter_threshold=1.5), "filter_threshold=1.5 of method 'clear' must be >= 0 and <= 1"),
    ("clear", 2, dict(correct_threshold=-0.1), "correct_threshold=-0.1 of method 'clear' must be >= 0 and <= 1")])
def test_bad_input(world, method, budget, options, message):
    pool, lm, tok = world
    with pytest.raises(ValueError, match=message): select(pool, method, budget, model=lm, tokenizer=tok, **options)


@pytest.mark.parametrize("method", ["instruction-mining", "clear"])
def test_missing_field(world, method):
    pool, lm, tok = world
    with pytest.raises(ValueError, match="examples\\[8\\] has no 'answer'"): select(pool + [dict(prompt="x")], method, 2, model=lm, tokenizer=tok)
