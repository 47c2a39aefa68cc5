"VB-LoRA's compact file (save_only_topk_weights): ours has PEFT's tensor names, dtypes, shapes and values, PEFT loads it and we load PEFT's with the same logits (1e-5), and a model loaded from one refuses to train, as PEFT's does."
import peft, pytest, torch
from safetensors.torch import load_file
from peftlab.core.models import tiny_llama
from peftlab.core.registry import apply
from peftlab.core.io import save_adapter, load_adapter
from peftlab.core.adapter import merge
from peftlab.core.testing import assert_close
from peft_roundtrip import perturb, inputs

# (our options, PEFT's): one-byte indices on two targets; two-byte indices (N >= 256), k = 3, every linear layer, dropout
CASES = [
    (dict(r=2, num_vectors=32, vector_length=16, topk=2, targets=["q_proj", "v_proj"]),
     dict(r=2, num_vectors=32, vector_length=16, topk=2, target_modules=["q_proj", "v_proj"])),
    (dict(r=4, num_vectors=300, vector_length=32, topk=3, targets="all-linear", dropout=0.1),
     dict(r=4, num_vectors=300, vector_length=32, topk=3, target_modules="all-linear", vblora_dropout=0.1)),
]
IDS = ["uint8-indices", "int16-indices"]

def tensors(d): return load_file(f"{d}/adapter_model.safetensors")
def layout(state): return {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}
def logits(model): return model(**inputs()).logits

@pytest.mark.parametrize("ours_kw,peft_kw", CASES, ids=IDS)
def test_peft_loads_our_compact_file(ours_kw, peft_kw, tmp_path):
    ours = perturb(apply(tiny_llama(), "vblora", **ours_kw, save_only_topk_weights=True)).eval()
    save_adapter(ours, tmp_path/"ours")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path/"ours").eval()
    assert_close(logits(theirs), logits(ours))
    # PEFT writes the same adapter's compact file itself (loading our full file, then saving compact): the same tensors
    full = apply(tiny_llama(), "vblora", **ours_kw); full.load_state_dict(ours.state_dict()); save_adapter(full, tmp_path/"full")
    again = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path/"full")
    again.peft_config["default"].save_only_topk_weights = True
    again.save_pretrained(tmp_path/"peft")
    mine, peft_file = tensors(tmp_path/"ours"), tensors(tmp_path/"peft")
    assert layout(mine) == layout(peft_file) and any(k.endswith("_topk_indices") for k in mine)
    assert all(torch.equal(mine[k], peft_file[k]) for k in mine)

@pytest.mark.parametrize("ours_kw,peft_kw", CASES, ids=IDS)
def test_we_load_peft_compact_file(ours_kw, peft_kw, tmp_path):
    torch.manual_seed(0)
    theirs = perturb(peft.get_peft_model(tiny_llama(), peft.VBLoRAConfig(**peft_kw, save_only_topk_weights=True))).eval()
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(tiny_llama(), tmp_path).eval()
    assert ours.peftlab_method[1].save_only_topk_weights
    assert_close(logits(ours), logits(theirs))
    save_adapter(ours, tmp_path/"back")           # saved again it is compact, and PEFT reads it back: the same outputs
    assert layout(tensors(tmp_path/"back")) == layout(tensors(tmp_path))
    assert_close(logits(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path/"back").eval()), logits(theirs))
    out = logits(ours); merge(ours); assert_close(logits(ours), out, rtol=1e-4, atol=1e-4)   # merging works (float32 sums in another order)

def test_compact_model_refuses_training_as_peft_does(tmp_path):
    ours_kw, peft_kw = CASES[0]
    save_adapter(perturb(apply(tiny_llama(), "vblora", **ours_kw, save_only_topk_weights=True)), tmp_path)
    ours = load_adapter(tiny_llama(), tmp_path).train()
    with pytest.raises(RuntimeError, match="loaded from a save_only_topk_weights file.*not training"): logits(ours)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True).train()
    with pytest.raises(RuntimeError, match="Found infinity values in VB-LoRA logits"): logits(theirs)
    full = apply(tiny_llama(), "vblora", **ours_kw).train()   # a model built (or loaded) from logits trains as before
    logits(full).sum().backward()
