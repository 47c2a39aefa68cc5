"Mixtures of LoRA experts against PEFT: peftlab's `poly` and `mhr` hold PEFT's Poly tensors under PEFT's names and give the same logits for the same task ids; files move both ways."
import pytest, torch
import peft
from peftlab.core.models import tiny_llama
from peftlab.core.registry import apply
from peftlab.core.io import adapter_tensors, save_adapter, load_adapter

TARGETS = ["q_proj", "v_proj", "down_proj"]
CASES = [  # (method, r, n_tasks, n_skills, n_splits)
    ("poly", 4, 3, 4, 1),
    ("mhr", 4, 3, 4, 4),
    ("mhr", 2, 5, 2, 8),
    ("mhr", 8, 2, 3, 2),
]

def pair(method, r, n_tasks, n_skills, n_splits):
    "PEFT's Poly and ours on the same tiny-llama, ours holding PEFT's (random, B non-zero) tensors."
    torch.manual_seed(0)
    cfg = peft.PolyConfig(task_type="CAUSAL_LM", r=r, n_tasks=n_tasks, n_skills=n_skills, n_splits=n_splits,
                          target_modules=TARGETS, init_weights=False)
    ref = peft.get_peft_model(tiny_llama(), cfg)
    ours = apply(tiny_llama(), method, r=r, n_tasks=n_tasks, n_skills=n_skills, n_splits=n_splits, targets=TARGETS)
    theirs, mine = peft.get_peft_model_state_dict(ref), adapter_tensors(ours)
    assert sorted(theirs) == sorted(mine)   # same names, PEFT's layout
    with torch.no_grad():
        for k, v in theirs.items():
            assert mine[k].shape == v.shape, k
            mine[k].copy_(v)
    return ref.eval(), ours.eval()

@pytest.mark.parametrize("method,r,n_tasks,n_skills,n_splits", CASES)
def test_same_logits_as_peft(method, r, n_tasks, n_skills, n_splits):
    ref, ours = pair(method, r, n_tasks, n_skills, n_splits)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randint(0, 1000, (6, 9), generator=g), torch.randint(0, n_tasks, (6,), generator=g)
    with torch.no_grad():
        a, b = ref(input_ids=x, task_ids=t).logits, ours(input_ids=x, task_ids=t).logits
        base = tiny_llama()(x).logits
    assert (a - base).abs().max() > 1e-2   # the adapters change the logits ...
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)   # ... and ours the same way as PEFT's

def test_peft_file_loads_and_ours_loads_in_peft(tmp_path):
    ref, ours = pair("mhr", 4, 3, 4, 4)
    x, t = torch.randint(0, 1000, (3, 5)), torch.tensor([2, 0, 1])
    with torch.no_grad(): want = ref(input_ids=x, task_ids=t).logits
    ref.save_pretrained(tmp_path/"peft")
    mine = load_adapter(tiny_llama(), tmp_path/"peft").eval()
    assert mine.peftlab_method[0] == "mhr"   # n_splits > 1: MHR takes the file
    with torch.no_grad(): torch.testing.assert_close(mine(input_ids=x, task_ids=t).logits, want, atol=1e-5, rtol=1e-5)
    save_adapter(ours, tmp_path/"ours")
    back = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path/"ours").eval()
    with torch.no_grad(): torch.testing.assert_close(back(input_ids=x, task_ids=t).logits, want, atol=1e-5, rtol=1e-5)

def test_poly_file_goes_to_poly(tmp_path):
    ref, _ = pair("poly", 4, 3, 4, 1)
    ref.save_pretrained(tmp_path)
    assert load_adapter(tiny_llama(), tmp_path).peftlab_method[0] == "poly"

@pytest.mark.parametrize("options,message", [
    (dict(n_splits=3), "n_splits=3 does not divide"),
    (dict(n_skills=0), "n_skills=0"),
    (dict(n_tasks=0), "n_tasks=0"),
    (dict(r=0), "r=0"),
])
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message): apply(tiny_llama(), "mhr", **options)

@pytest.mark.parametrize("task_ids,message", [
    (None, "got no task ids"),
    ([0, 3], "task id 3 is out of range"),
    ([0, -1], "task id -1 is out of range"),
    ([0, 1, 2], "3 entries for a batch of 2 rows"),
])
def test_bad_task_ids(task_ids, message):
    m = apply(tiny_llama(), "mhr", n_tasks=3, targets=["q_proj"])
    kw = {} if task_ids is None else dict(task_ids=task_ids)
    with pytest.raises(ValueError, match=message): m(input_ids=torch.randint(0, 100, (2, 4)), **kw)

def test_fit_passes_task_ids():
    from peftlab.core.train import fit
    from peftlab.merge.mhr import with_task_ids
    m = apply(tiny_llama(), "mhr", n_tasks=2, targets=["q_proj"])
    x = torch.randint(0, 100, (2, 6))
    batches = with_task_ids([dict(input_ids=x, attention_mask=torch.ones_like(x), labels=x)], 1)
    logits = m.model.layers[0].self_attn.q_proj.poly_router.module_logits
    before = logits.detach().clone()
    fit(m, batches, steps=2, lr=1e-2, progress=False)
    assert not torch.equal(before[1], logits[1]) and torch.equal(before[0], logits[0])   # only task 1's router row trained
