"What the PEFT round-trip tests share: random adapter values and one left-padded batch."
import torch

def perturb(model, seed=0, std=0.1):
    "Give every trainable tensor random, non-trivial values."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad: p.add_(torch.randn(p.shape, generator=g) * std)
    return model

def inputs():
    "Two rows of token ids, the first left-padded by two."
    x = torch.randint(3, 1000, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(x); mask[0, :2] = 0   # left padding on one row
    return dict(input_ids=x, attention_mask=mask)

def snapshot(model):
    "The model's tensors and module types, to show later that nothing changed."
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]

def assert_unchanged(model, before):
    "The model has the tensors and modules of `snapshot` `before`, and no adapter or method record."
    from peftlab.core.adapter import adapters
    (state, types), (after_state, after_types) = before, snapshot(model)
    assert after_types == types and not adapters(model) and not hasattr(model, "peftlab_method")
    assert all(torch.equal(state[k], after_state[k]) for k in state)

def assert_peft_file_refused(make_base, peft_config, option:str, directory):
    "PEFT's file written with `peft_config`: loading it raises naming `option` and the PEFT version, and changes nothing."
    import json, peft, pytest
    from peftlab.core.io import load_adapter
    peft.get_peft_model(make_base(), peft_config).save_pretrained(directory)
    version = json.loads((directory/"adapter_config.json").read_text())["peft_version"]
    base = make_base(); before = snapshot(base)
    with pytest.raises(ValueError) as e: load_adapter(base, directory)
    assert option in str(e.value) and f"PEFT {version}" in str(e.value), str(e.value)
    assert_unchanged(base, before)
