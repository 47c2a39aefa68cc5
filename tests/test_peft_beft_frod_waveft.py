"BEFT, FRoD and WaveFT: PEFT's files load into peftlab and ours into PEFT with the same logits (1e-5), for several seeded random configs; merging keeps the outputs; PEFT options peftlab lacks are refused by name, with nothing changed."
import random
import peft, pytest, torch
from safetensors.torch import load_file
from peftlab.core.models import tiny_llama
from peftlab.core.registry import apply
from peftlab.core.io import save_adapter, load_adapter
from peftlab.core.adapter import adapters, merge, unmerge
from peftlab.core.testing import assert_close
from peft_roundtrip import perturb as _perturb, inputs, assert_peft_file_refused

TARGETS = [["q_proj", "v_proj"], ["k_proj", "down_proj"], "all-linear", ["o_proj", "gate_proj", "up_proj"]]

def beft_case(rng):
    kw = dict(targets=rng.choice(TARGETS + [["v_proj"]]), init=rng.choice(["zeros", "gaussian"]))
    return ("beft", kw, lambda: peft.BeftConfig(target_modules=kw["targets"], init_weights=kw["init"] == "zeros"), rng.choice([False, True]))

def frod_case(rng):
    kw = dict(targets=rng.choice(TARGETS), sparse_rate=rng.choice([0.0, 0.01, 0.05, 0.2]), projection_prng_key=rng.choice([0, 7]),
              save_projection=rng.choice([True, False]), regularization_alpha=rng.choice([1e-3, 1e-1]), init=rng.choice(["zeros", "gaussian"]))
    return ("frod", kw, lambda: peft.FrodConfig(target_modules=kw["targets"], sparse_rate=kw["sparse_rate"], projection_prng_key=kw["projection_prng_key"],
                                                save_projection=kw["save_projection"], regularization_alpha=kw["regularization_alpha"],
                                                init_weights=kw["init"] == "zeros", progressbar=False), rng.choice([False, True]))

def waveft_case(rng):
    kw = dict(targets=rng.choice(TARGETS), n_frequency=rng.choice([1, 20, 150]), scaling=rng.choice([1.0, 25.0]),
              wavelet_family=rng.choice(["db1", "db2", "db3", "db5", "db10"]), use_idwt=rng.choice([True, True, False]),
              random_loc_seed=rng.choice([777, 3]), n_frequency_pattern=rng.choice([{}, {"down_proj": 7, "q_proj": 11}]),
              proportional_parameters=rng.choice([False, True]), init=rng.choice(["zeros", "gaussian"]))
    return ("waveft", kw, lambda: peft.WaveFTConfig(target_modules=kw["targets"], n_frequency=kw["n_frequency"], scaling=kw["scaling"],
                                                    wavelet_family=kw["wavelet_family"], use_idwt=kw["use_idwt"], random_loc_seed=kw["random_loc_seed"],
                                                    n_frequency_pattern=kw["n_frequency_pattern"], proportional_parameters=kw["proportional_parameters"],
                                                    init_weights=kw["init"] == "zeros"), False)

def seeded_cases(make, n, seed):
    rng = random.Random(seed)
    return [make(rng) for _ in range(n)]

CASES = seeded_cases(beft_case, 2, seed=0) + seeded_cases(frod_case, 3, seed=1) + seeded_cases(waveft_case, 3, seed=2)
IDS = [f"{c[0]}-{i}" for i, c in enumerate(CASES)]

def base(bias:bool=False):
    "tiny-llama with a 1000-token vocabulary (the inputs' range, and cheap to build); BEFT merges into a bias only where there is one."
    return tiny_llama(vocab_size=1000, attention_bias=bias, mlp_bias=bias)
def perturb(model, seed=0): return _perturb(model, seed, std=0.05).eval()   # dropout off: the outputs are comparable

@pytest.mark.parametrize("name,kw,peft_cfg,bias", CASES, ids=IDS)
def test_files_both_ways(name, kw, peft_cfg, bias, tmp_path):
    "PEFT's file loads here with PEFT's logits; saved again by peftlab (our config and layout), PEFT reads it back with the same logits."
    torch.manual_seed(0)
    theirs = perturb(peft.get_peft_model(base(bias), peft_cfg()))
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(base(bias), tmp_path).eval()
    assert ours.peftlab_method[0] == name
    assert_close(ours(**inputs()).logits, theirs(**inputs()).logits)
    save_adapter(ours, tmp_path/"back")           # and PEFT reads our copy back: the same outputs again
    again = peft.PeftModel.from_pretrained(base(bias), tmp_path/"back").eval()
    assert_close(again(**inputs()).logits, theirs(**inputs()).logits)

@pytest.mark.parametrize("name,kw,peft_cfg,bias", [c for c in CASES if c[0] != "beft" or c[3]], ids=[i for i, c in zip(IDS, CASES) if c[0] != "beft" or c[3]])
def test_merge_equals_unmerged(name, kw, peft_cfg, bias):
    m = perturb(apply(base(bias), name, **kw))
    out = m(**inputs()).logits
    before = {k: v.clone() for k, v in m.state_dict().items() if ".base_layer." in k}
    merge(m); assert_close(m(**inputs()).logits, out, rtol=1e-4, atol=1e-4)  # float32 sums in another order
    unmerge(m)
    after = m.state_dict()
    for k, v in before.items(): assert_close(after[k], v, rtol=1e-5, atol=1e-6)
    assert_close(m(**inputs()).logits, out, rtol=1e-4, atol=1e-4)

def test_beft_on_a_bias_free_base_refuses_to_merge():
    m = perturb(apply(base(), "beft"))
    with pytest.raises(ValueError, match="beft cannot merge into model.layers.0.self_attn.v_proj: its base layer has no bias"): merge(m)
    assert not any(a.merged for a in adapters(m).values())

def test_frod_without_projections_saves_none(tmp_path):
    m = perturb(apply(base(), "frod", targets=["q_proj"], sparse_rate=0.05, save_projection=False))
    save_adapter(m, tmp_path)
    assert not any(k.startswith("base_model.frod_") for k in load_file(tmp_path/"adapter_model.safetensors"))
    save_adapter(apply(base(), "frod", targets=["q_proj"], sparse_rate=0.05), tmp_path/"with")
    keys = load_file(tmp_path/"with"/"adapter_model.safetensors")
    assert {"base_model.frod_V.self_attn_q_proj", "base_model.frod_s_indices.self_attn_q_proj", "base_model.frod_s_size.self_attn_q_proj"} <= keys.keys()

@pytest.mark.parametrize("wavelet", [f"db{n}" for n in range(1, 11)])
def test_idwt_matches_peft(wavelet):
    "Our inverse wavelet transform and Daubechies filters against PEFT's (PyWavelets') over odd shapes, to 1e-5."
    from peft.tuners.waveft.waverec2d import waverec2d
    from peft.tuners.waveft.wavelet import Wavelet
    from peftlab.adapters.waveft import idwt2, daubechies, WAVELETS
    assert_close(torch.tensor(daubechies(WAVELETS[wavelet])), torch.tensor(Wavelet(wavelet).rec_lo, dtype=torch.float64), rtol=1e-10, atol=1e-10)
    g = torch.Generator().manual_seed(0)
    for h, w in [(12, 12), (13, 17), (24, 11)]:
        bands = [torch.randn(h, w, generator=g) for _ in range(4)]
        assert_close(idwt2(*bands, wavelet=wavelet), waverec2d((bands[0], tuple(bands[1:])), wavelet))

# (a PEFT config with an option peftlab does not support, the option's name in the error)
REFUSED = [
    (lambda: peft.BeftConfig(target_modules=["v_proj"], modules_to_save=["lm_head"]), "modules_to_save=['lm_head']"),
    (lambda: peft.FrodConfig(target_modules=["q_proj"], layers_to_transform=[1], progressbar=False), "layers_to_transform=[1]"),
    (lambda: peft.WaveFTConfig(target_modules=["q_proj"], n_frequency=10, wavelet_family="sym3"), "wavelet_family='sym3'"),
]

@pytest.mark.parametrize("peft_cfg,option", REFUSED, ids=[o for _, o in REFUSED])
def test_unsupported_peft_option_is_refused(peft_cfg, option, tmp_path):
    assert_peft_file_refused(base, peft_cfg(), option, tmp_path)
