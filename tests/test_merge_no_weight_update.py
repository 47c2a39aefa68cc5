"`merge` refuses methods whose learning lives outside the layers' weights, instead of returning the model unchanged in silence."
import pytest, torch
import peftlab as pl
from peftlab.core.adapter import adapter_records

MODEL_LEVEL = {"prompt-tuning": {}, "prefix-tuning": {}, "p-tuning": {}, "adaption-prompt": {}, "multitask-prompt-tuning": {},
               "cartridge": {}, "shadow": dict(r=8, shadow_intermediate_size=8, shadow_attention_heads=2)}

@pytest.mark.parametrize("method", list(MODEL_LEVEL))
def test_merge_refuses_and_keeps_the_adapter(method):
    torch.manual_seed(0)
    model = pl.apply(pl.load_model("tiny-llama"), method, **MODEL_LEVEL[method])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=f"{method} .*adds no weight update to merge.*save_adapter"): pl.merge(model)
    with pytest.raises(TypeError, match="Nothing was merged"): pl.merge(model, unload_adapters=True)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert adapter_records(model)   # still applied
