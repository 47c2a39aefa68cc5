"Monitors, TMI and knowledge injection on hand-checked cases: pathway distances of known choices, complexities of known activations, coding rates of known layouts, the stub injection, and the errors for bad intervals, empty examples and batches made for another model."
import math
import pytest
import torch
from peftlab.core.models import tiny_llama
from peftlab.core.registry import methods
from peftlab.core.train import fit
from peftlab.analysis.monitors import (pathways, pathway_distance, pathway_complexity, grokking_monitor,
                                       memorisation_monitor, monitor_correlations)
from peftlab.analysis.tmi import coding_rate, tmi_score, h_score, answer_features, rank_by_tmi
from peftlab.analysis.knowledge_injection import injection_facts, knowledge_injection

# activities (one layer), share chosen, pathway distance: mean over pairs of 1 - Jaccard of the top-k sets
PATHWAY_CASES = [([[4., 3, 1, 0], [3., 4, 0, 1], [0., 1, 3, 4]], 0.5, 2 / 3),   # {0,1} {0,1} {2,3}: 0, 1, 1
                 ([[4., 3, 1, 0], [3., 4, 0, 1], [4., 0, 3, 1]], 0.5, 4 / 9),   # {0,1} {0,1} {0,2}: 0, 2/3, 2/3
                 ([[1., 0, 0, 0], [1., 0, 0, 0]], 0.25, 0.0),                   # one shared neuron
                 ([[1., 0, 0, 0], [0., 1, 0, 0]], 0.25, 1.0)]                   # disjoint

@pytest.mark.parametrize("activity,top,distance", PATHWAY_CASES)
def test_pathway_distance(activity, top, distance):
    assert pathway_distance(pathways([torch.tensor(activity)], top)) == pytest.approx(distance, abs=1e-6)

# activity, complexity exp(H)/width
COMPLEXITY_CASES = [([[1., 1, 1, 1]], 1.0), ([[0., 5, 0, 0]], 0.25), ([[1., 1, 0, 0]], 0.5), ([[3., 3, 3, 0]], 0.75)]

@pytest.mark.parametrize("activity,complexity", COMPLEXITY_CASES)
def test_pathway_complexity(activity, complexity):
    assert pathway_complexity([torch.tensor(activity)]) == pytest.approx(complexity, abs=1e-6)

def _probe(vocab=32):
    ids = torch.randint(3, vocab, (6, 5), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100); labels[:, 3:] = ids[:, 3:]
    return [dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)]

def test_monitors_record_without_disturbing_training():
    probe, losses = _probe(), {}
    for on in (False, True):
        cbs = [grokking_monitor(probe, every=3), memorisation_monitor(probe, held_out=probe, every=3)] if on else []
        losses[on] = fit(tiny_llama(vocab_size=32).requires_grad_(True), probe, steps=3, lr=1e-2, progress=False, callbacks=cbs).losses
    assert losses[True] == losses[False]
    assert cbs[0].df().index.tolist() == [0, 3] and cbs[1].df().loss_gap.abs().max() < 1e-9
    assert {"grokking-monitor", "memorisation-monitor", "tmi", "knowledge-injection"} <= set(methods("analysis").name)

@pytest.mark.parametrize("make,match", [(lambda p: grokking_monitor(p, every=0), "every"),
                                        (lambda p: grokking_monitor([]), "probe set is empty"),
                                        (lambda p: grokking_monitor(p, top=0), "top"),
                                        (lambda p: memorisation_monitor(p, held_out=[]), "held_out is empty")])
def test_monitor_errors(make, match):
    with pytest.raises((ValueError, TypeError), match=match): make(_probe())

def test_correlations():
    import pandas as pd
    c = monitor_correlations(pd.DataFrame(dict(a=[1., 2, 3], b=[3., 2, 1], t=[0., 1, 2])), "t")
    assert c.tolist() == pytest.approx([1, -1])

def test_tmi_hand_checked():
    opposite, orthogonal, y = torch.tensor([[1., 0], [-1, 0], [0, 1], [0, -1]]), torch.tensor([[1., 0], [0, 1], [-1, 0], [0, -1]]), [0, 0, 1, 1]
    assert tmi_score(opposite, y, eps=1.0) == pytest.approx(0.5 * math.log(3), abs=1e-9)
    assert tmi_score(orthogonal, y, eps=1.0) == pytest.approx(0.5 * math.log(4), abs=1e-9)
    assert coding_rate(torch.full((4, 3), 3 ** -0.5, dtype=torch.float64), eps=1.0) == pytest.approx(0.5 * math.log(4), abs=1e-9)
    assert h_score(opposite, y) == pytest.approx(0.0, abs=1e-9)

def test_tmi_errors():
    m, probe = tiny_llama(vocab_size=32), _probe()
    assert answer_features(m, probe, layer=0)[0].shape == (6, 64)
    with pytest.raises(ValueError, match="outside the model's vocabulary of 20"): answer_features(tiny_llama(vocab_size=20), probe)
    with pytest.raises(ValueError, match="no target examples"): answer_features(m, [])
    with pytest.raises(ValueError, match="hidden states 0..2"): answer_features(m, probe, layer=5)
    with pytest.raises(ValueError, match="no models to rank"): rank_by_tmi({}, probe)

def test_knowledge_injection_stub():
    def train(model, examples, phase):
        for i, e in enumerate(examples):
            if phase == "learn" or i % 2 == 0: model[e["prompt"]] = e["answer"]
    score = lambda model, examples: [model.get(e["prompt"]) == e["answer"] for e in examples]
    t = knowledge_injection({}, injection_facts(2, 2, 1, seed=0), train, score)
    assert t.loc["new", ["seen", "rephrased"]].tolist() == [0.5, 0.0]
    assert t.loc["updated", "old answer"] == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="at least one fact to inject"): injection_facts(0, 0)
