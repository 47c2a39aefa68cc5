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

def assert_peft_loads_ours(make_base, name:str, kw:dict, directory):
    "Our adapter `name` with random values, saved: PEFT loads the file with the same logits. Returns (ours, theirs)."
    from peftlab.core.registry import apply
    from peftlab.core.io import save_adapter
    from peftlab.core.testing import assert_close
    import peft
    ours = perturb(apply(make_base(), name, **kw)).eval()   # eval: dropout off, the outputs are comparable
    save_adapter(ours, directory)
    theirs = peft.PeftModel.from_pretrained(make_base(), directory).eval()
    assert_close(theirs(**inputs()).logits, ours(**inputs()).logits)
    return ours, theirs

def assert_we_load_peft(make_base, name:str, peft_config, directory, back:bool=True):
    "PEFT's adapter with random values, saved: peftlab loads it as `name` with the same logits; with `back`, PEFT reads our copy again."
    from peftlab.core.io import save_adapter, load_adapter
    from peftlab.core.testing import assert_close
    import peft
    torch.manual_seed(0)
    theirs = perturb(peft.get_peft_model(make_base(), peft_config)).eval()
    theirs.save_pretrained(directory)
    expected = theirs(**inputs()).logits           # before ours runs: a sampling adapter's seeded generator draws first here
    ours = load_adapter(make_base(), directory).eval()
    assert ours.peftlab_method[0] == name
    assert_close(ours(**inputs()).logits, expected)
    if back:
        save_adapter(ours, directory/"back")
        again = peft.PeftModel.from_pretrained(make_base(), directory/"back").eval()
        assert_close(again(**inputs()).logits, expected)
