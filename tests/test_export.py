"Merged export: `AutoModelForCausalLM.from_pretrained` on the saved directory gives the adapted model's logits, from Python and from `peftlab merge`."
from pathlib import Path
import pytest, torch
from transformers import AutoModelForCausalLM
from peftlab.core.models import tiny_llama, load_model, load_tokenizer
from peftlab.core.registry import apply
from peftlab.core.io import save_adapter, load_adapter
from peftlab.core.export import save_merged, merge_for_export, quantized_names, requantization_error, gguf_ready
from peftlab.core.testing import assert_close
from peftlab.core.cli import main

IDS = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))

def trained_like(model, seed=0, scale=0.02):
    "Move every trainable parameter, as training would (LoRA's B starts at 0, so an untrained merge adds nothing)."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad: p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model

def logits(model):
    with torch.no_grad(): return model(IDS).logits

# (method, options): layer adapters whose update folds into the weight
CASES = [("lora", dict(r=4)), ("lora", dict(r=4, targets=["q_proj", "v_proj"], rslora=True)), ("qlora", dict(r=4)),
         ("qlora", dict(r=4, double_quant=True)), ("dora", dict(r=4))]

@pytest.mark.parametrize("method,options", CASES)
def test_merged_directory_loads_with_the_adapted_logits(tmp_path, method, options):
    model = trained_like(apply(tiny_llama(), method, **options))
    adapted = logits(model)
    out = save_merged(model, tmp_path/"merged")
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert_close(logits(loaded), adapted, rtol=1e-4, atol=1e-4, msg=f"{method} merged")
    assert "quantization_config" not in loaded.config.to_dict()
    assert all(type(m).__module__.startswith(("transformers", "torch")) for m in loaded.modules())

def test_untrained_merge_is_the_base(tmp_path):
    base = logits(tiny_llama())
    loaded = AutoModelForCausalLM.from_pretrained(save_merged(apply(tiny_llama(), "lora", r=4), tmp_path/"m")).eval()
    assert_close(logits(loaded), base, rtol=1e-5, atol=1e-5)

def test_requantization_error():
    model = apply(tiny_llama(), "qlora", r=4)
    names = quantized_names(model)
    assert len(names) == 14 and names[0] == "model.layers.0.self_attn.q_proj"
    zero = requantization_error(merge_for_export(model), names, IDS)  # B = 0: the merged weights are on the NF4 grid
    assert zero["weight_max_abs"] < 1e-6 and zero["logits_max_abs"] < 1e-4
    model = trained_like(apply(tiny_llama(), "qlora", r=4), scale=0.05)
    err = requantization_error(merge_for_export(model), names, IDS)
    assert 0 < err["weight_mean_abs"] <= err["weight_max_abs"] and err["logits_max_abs"] > 1e-3

@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_peftlab_merge(tmp_path, capsys, method):
    adapter = tmp_path/"adapter"
    main(["finetune", "--model", "tiny-llama", "--method", method, "--set", "r=4", "--steps", "2", "--lr", "0.05",
          "--n-train", "8", "--n-test", "1", "--max-new-tokens", "2", "--out", str(adapter)])
    adapted = logits(load_adapter(load_model("tiny-llama"), adapter))
    capsys.readouterr()
    out = main(["merge", "--model", "tiny-llama", "--adapter", str(adapter), "--out", str(tmp_path/"merged")])
    printed = capsys.readouterr().out
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert_close(logits(loaded), adapted, rtol=1e-4, atol=1e-4, msg=f"peftlab merge ({method})")
    assert gguf_ready(out) == []
    assert load_tokenizer(out)("hello").input_ids == load_tokenizer("tiny-llama")("hello").input_ids
    assert ("Re-quantising the merged model to NF4 would move" in printed) == (method == "qlora")

def test_gguf_ready_names_the_problems(tmp_path):
    out = save_merged(apply(tiny_llama(), "lora", r=4), tmp_path/"m")  # no tokenizer given
    assert gguf_ready(out) == ["no tokenizer files: pass the tokenizer to save_merged"]
    (out/"model.safetensors").unlink()
    assert "no *.safetensors weights" in gguf_ready(out)
    assert gguf_ready(tmp_path/"none")[0].endswith("config.json is missing: save the model with save_pretrained")
