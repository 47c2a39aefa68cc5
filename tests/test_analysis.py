"The analysis package on hand-checked cases: intruder dimensions of a planted direction, ranks of known spectra, the forgetting matrix of a stub, and the errors for models of different shapes."
import math
import pytest
import torch
from peftlab.core.models import tiny_llama
from peftlab.core.registry import apply, methods
from peftlab.analysis.core import weight_pairs, weight_deltas
from peftlab.analysis.spectrum import effective_rank, stable_rank, top_alignment, spectrum
from peftlab.analysis.intruders import intruder_dimensions, intruder_similarity, intruders
from peftlab.analysis.forgetting import forgetting_matrix

def planted(scale:float):
    "diag(4, 3, 2, 1) in a 6 x 4 matrix, and the same plus `scale` e5 e4ᵀ (e5 is orthogonal to every base vector)."
    W0 = torch.zeros(6, 4); W0[:4] = torch.diag(torch.tensor([4., 3, 2, 1]))
    return W0, W0 + scale * torch.outer(torch.eye(6)[4], torch.eye(4)[3])

# scale, k, threshold, intruder ranks: the new column e4 + s e5 has singular value sqrt(1 + s²) and cosine 1/sqrt(1 + s²) with e4
INTRUDER_CASES = [(5.0, 4, 0.5, [0]),     # sqrt(26) > 4: ranked first, cosine 0.196
                  (5.0, 4, 0.1, []),      # 0.196 is above the threshold
                  (5.0, 1, 0.5, [0]),     # only the top vector examined
                  (2.0, 4, 0.5, [2]),     # sqrt(5) = 2.24: below 4 and 3, above 2; cosine 0.447
                  (2.0, 2, 0.5, []),      # ... so not among the top two
                  (0.0, 4, 0.99, [])]     # nothing planted

@pytest.mark.parametrize("scale,k,threshold,ranks", INTRUDER_CASES)
def test_planted_direction(scale, k, threshold, ranks):
    W0, W1 = planted(scale)
    assert intruder_dimensions(W0, W1, k=k, threshold=threshold) == ranks
    if scale: assert min(intruder_similarity(W0, W1, k=4).tolist()) == pytest.approx(1 / math.sqrt(1 + scale ** 2), abs=1e-6)

# singular values, effective rank exp(H(σ/Σσ)), stable rank Σσ²/σ1²
SPECTRA = [([1., 1, 1, 1, 1], 5.0, 5.0),
           ([2., 1, 1], 2 ** 1.5, 1.5),
           ([3., 0, 0], 1.0, 1.0),
           ([1., 1, 0, 0], 2.0, 2.0),
           ([0., 0], 0.0, 0.0)]

@pytest.mark.parametrize("values,effective,stable", SPECTRA)
def test_ranks_of_known_spectra(values, effective, stable):
    s = torch.tensor(values)
    assert effective_rank(s) == pytest.approx(effective, abs=1e-9)
    assert stable_rank(s) == pytest.approx(stable, abs=1e-9)
    Q = torch.linalg.qr(torch.randn(len(values), len(values), generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    assert effective_rank(Q @ torch.diag(s.double()) @ Q.T) == pytest.approx(effective, abs=1e-6)   # from the matrix, rotated

def test_alignment_with_top_directions():
    W0 = torch.diag(torch.tensor([5., 4, 3, 2, 1]))
    e = torch.eye(5)
    assert top_alignment(torch.outer(e[0], e[1]), W0, k=2) == pytest.approx(1.0)
    assert top_alignment(torch.outer(e[4], e[4]), W0, k=2) == pytest.approx(0.0)
    assert top_alignment(torch.eye(5), W0, k=2) == pytest.approx(0.4)

def _stub_train(model, task):
    for k in model: model[k] /= 2
    model[task] = 1.0

def test_forgetting_matrix_stub():
    fm = forgetting_matrix(lambda: {"H": 0.8}, ["A", "B", "C"], _stub_train, lambda m, t: m.get(t, 0.0), held_out=["H"])
    assert fm.scores.values.tolist() == [[0, 0, 0, 0.8], [1, 0, 0, 0.4], [0.5, 1, 0, 0.2], [0.25, 0.5, 1, 0.1]]
    assert fm.forgetting().tolist() == pytest.approx([0.75, 0.5, 0.0, 0.7])
    assert fm.learned().tolist() == [1.0, 1.0, 1.0]
    assert fm.backward_transfer() == pytest.approx(-0.625)
    loss = forgetting_matrix(lambda: {"H": 0.8}, ["A", "B", "C"], _stub_train, lambda m, t: 1 - m.get(t, 0.0), held_out=["H"], higher_is_better=False)
    assert loss.forgetting().tolist() == pytest.approx([0.75, 0.5, 0.0, 0.7])

def test_lora_delta_is_its_product():
    lo = apply(tiny_llama(), "lora", r=2)
    q = lo.model.layers[0].self_attn.q_proj
    with torch.no_grad(): q.lora_B.weight.normal_()
    d = weight_deltas(tiny_llama(), lo)
    torch.testing.assert_close(d["model.layers.0.self_attn.q_proj"], q.lora_B.weight @ q.lora_A.weight * q.scaling)
    assert intruders(lo).shape[0] == spectrum(lo).shape[0] == 14

SHAPE_ERRORS = [(dict(intermediate_size=96), "'model.layers.0.mlp.gate_proj' has shape (128, 64) in the base model but (96, 64) in the tuned model"),
                (dict(num_hidden_layers=3), "'model.layers.2.self_attn.q_proj' is in the tuned model but not in the base model"),
                (dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=1), "in the base model but")]

@pytest.mark.parametrize("overrides,message", SHAPE_ERRORS)
@pytest.mark.parametrize("analysis", [weight_pairs, spectrum, intruders])
def test_models_of_different_shapes(analysis, overrides, message):
    with pytest.raises(ValueError) as e: analysis(tiny_llama(), tiny_llama(**overrides))
    assert message in str(e.value)

def test_weights_of_different_shapes():
    with pytest.raises(ValueError, match="compare weights of one layer"): intruder_similarity(torch.zeros(6, 4), torch.zeros(4, 6))
    with pytest.raises(ValueError, match="must match"): top_alignment(torch.zeros(6, 4), torch.zeros(4, 6))

def test_registered_as_analyses():
    names = set(methods("analysis").name)
    assert {"spectrum", "intruder-dimensions", "forgetting-matrix", "post-training-power-law", "thin-wrapper", "output-diversity"} <= names
    with pytest.raises(ValueError, match="an analysis of a model or its update"): apply(tiny_llama(), "intruder-dimensions")

# sizes, scores, a, b: score = a·n^b exactly, so the log-log fit returns them with R² = 1
POWER_LAWS = [([8, 16, 32, 64], [3 * n ** -0.5 for n in (8, 16, 32, 64)], 3.0, -0.5),
              ([1, 10, 100], [0.2, 0.4, 0.8], 0.2, math.log10(2)),   # doubling per decade
              ([5, 50], [7.0, 7.0], 7.0, 0.0)]                           # flat

@pytest.mark.parametrize("sizes,scores,a,b", POWER_LAWS)
def test_power_law_fit(sizes, scores, a, b):
    from peftlab.analysis.power_law import fit_power_law
    f = fit_power_law(sizes, scores)
    assert f["a"] == pytest.approx(a, rel=1e-9) and f["b"] == pytest.approx(b, abs=1e-12) and f["r2"] == pytest.approx(1.0)

def test_reverting_the_largest_entries():
    from torch import nn
    from peftlab.analysis.thin_wrapper import revert_largest
    class One(nn.Module):
        def __init__(self, w): super().__init__(); self.w = nn.Parameter(torch.tensor(w))
    base, tuned = One([1., 2, 3, 4]), One([1.1, -3, 3.2, 7])          # τ = [0.1, -5, 0.2, 3]
    for f, expected in [(0.0, [1.1, -3, 3.2, 7]), (0.25, [1.1, 2, 3.2, 7]), (0.5, [1.1, 2, 3.2, 4]), (1.0, [1., 2, 3, 4])]:
        assert revert_largest(base, tuned, f).w.tolist() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="has shape"): revert_largest(tiny_llama(), tiny_llama(intermediate_size=96), 0.1)

# samples (one list of outputs per input), n, per-input distinct-n, across-input distinct-n
DIVERSITY = [([["the cat sat", "the cat sat"], ["the dog ran", "the dog ran"]], 2, 0.5, 1.0),   # a parrot per input
             ([["a b c", "d e f"], ["a b c", "g h i"]], 2, 1.0, 0.5),                          # the same answer everywhere
             ([[[1, 2, 3], [1, 2, 4]]], 2, 0.75, 1.0),                                        # token ids
             ([["a b", "a c"]], 1, 0.75, 1.0)]

@pytest.mark.parametrize("samples,n,per_input,across", DIVERSITY)
def test_output_diversity(samples, n, per_input, across):
    from peftlab.analysis.diversity import output_diversity
    assert output_diversity(samples, n) == dict(per_input=pytest.approx(per_input), across_input=pytest.approx(across))
