"HF `Trainer` (and TRL's `SFTTrainer`) train a peftlab model unchanged: only the adapter moves, checkpoints load with `load_adapter`, resuming is exact, gradient checkpointing gives the same gradients."
import functools, inspect, os, sys, warnings
from pathlib import Path
import pytest, torch
from torch import nn
import transformers
from transformers import Trainer, TrainingArguments, TrainerCallback
from safetensors.torch import load_file
from peftlab.core.models import tiny_llama, load_tokenizer
from peftlab.core.registry import apply
from peftlab.core.data import get_task, sft_loader
from peftlab.core.io import load_adapter
from peftlab.core.train import fit
from peftlab.core.testing import assert_close
from peftlab.core.distributed import torchrun
from peftlab.core.data import encode_example
from peftlab.core.trainers import (sft_dataset, sft_collator, prepare_for_trainer, checkpointing, has_input_grads,
                                   AdapterCallback, training_state, prompt_completion_dataset)

# transformers 5.24 renamed gradient_checkpointing to activation_checkpointing (the old name still works, with a warning)
GC = "activation_checkpointing" if "activation_checkpointing" in inspect.signature(TrainingArguments).parameters else "gradient_checkpointing"

@functools.lru_cache
def tok(): return load_tokenizer("tiny-llama")

@functools.lru_cache
def examples(): return get_task("arithmetic", 16, 0, seed=0, digits=1).train

@functools.lru_cache
def dataset(): return sft_dataset(examples(), tok())

def lora_model(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return apply(tiny_llama(), "lora", r=4, targets="all-linear", dropout=dropout)

SMALL_RUN = dict(max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1, save_strategy="no",
                 report_to=[], use_cpu=True, seed=0, disable_tqdm=True)

def trainer(model, output_dir, callbacks=(), **kw):
    t = Trainer(model=model, args=TrainingArguments(str(output_dir), **{**SMALL_RUN, **kw}), train_dataset=dataset(),
                eval_dataset=dataset(), data_collator=sft_collator(tok()), callbacks=list(callbacks))
    t.remove_callback(transformers.trainer_callback.PrinterCallback)
    return t

def sft_trainer(model, output_dir, data, callbacks=(), **kw):
    "TRL's SFTTrainer with SFTConfig's own defaults (gradient checkpointing on) but float32."
    from trl import SFTTrainer, SFTConfig
    t = SFTTrainer(model=model, args=SFTConfig(str(output_dir), **{**SMALL_RUN, "bf16": False, **kw}), train_dataset=data,
                   eval_dataset=data, processing_class=tok(), callbacks=list(callbacks))
    t.remove_callback(transformers.trainer_callback.PrinterCallback)
    return t

def trainable(model): return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
def frozen(model): return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

@pytest.mark.parametrize("pack", [False, True])
def test_dataset_and_collator_give_sft_loaders_batches(pack):
    ds = sft_dataset(examples(), tok(), max_len=48, pack=pack)
    loader = sft_loader(examples(), tok(), batch_size=4, shuffle=False, max_len=48, pack=pack)
    assert len(ds) == len(loader.dataset)
    for i, batch in enumerate(loader):
        mine = sft_collator(tok())([ds[j] for j in range(4 * i, min(4 * i + 4, len(ds)))])
        same = lambda a, b: torch.equal(a, b) if torch.is_tensor(b) else a == b   # packed batches carry use_cache=False
        assert mine.keys() == batch.keys() and all(same(mine[k], batch[k]) for k in batch)

def test_trainer_trains_only_the_adapter(tmp_path):
    m = lora_model()
    base, start = frozen(m), trainable(m)
    t = trainer(m, tmp_path, max_steps=8)
    before = t.evaluate()["eval_loss"]
    t.train()
    after = t.evaluate()["eval_loss"]
    assert after < before - 0.1, (before, after)
    assert all(torch.equal(p, base[n]) for n, p in frozen(m).items())            # the base: bit-identical
    assert all(not torch.equal(p, start[n]) for n, p in trainable(m).items())    # every adapter tensor moved
    assert {n.split(".")[-2] for n in start} == {"lora_A", "lora_B"}

@pytest.mark.parametrize("full_weights", [True, False])
def test_checkpoints_hold_a_loadable_adapter(tmp_path, full_weights):
    m = lora_model()
    trainer(m, tmp_path, [AdapterCallback(full_weights)], max_steps=4, save_strategy="steps", save_steps=2).train()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "checkpoint-2", "checkpoint-4"]
    weights = load_file(tmp_path/"checkpoint-4"/"model.safetensors")
    if full_weights: assert any(".base_layer." in k for k in weights)   # Trainer's own save: the adapted module tree
    else: assert weights.keys() == training_state(m).keys()
    x = torch.randint(0, 49152, (2, 10), generator=torch.Generator().manual_seed(0))
    m.eval()
    for d in (tmp_path, tmp_path/"checkpoint-4"):
        assert torch.equal(load_adapter(tiny_llama(), d).eval()(x).logits, m(x).logits)
    assert not torch.equal(load_adapter(tiny_llama(), tmp_path/"checkpoint-2").eval()(x).logits, m(x).logits)

def test_callback_refuses_a_model_without_a_method(tmp_path):
    m = tiny_llama()
    before = {n: p.clone() for n, p in m.named_parameters()}
    with pytest.raises(ValueError, match="peftlab.apply"): trainer(m, tmp_path, [AdapterCallback()]).train()
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())

RESUME = [  # full checkpoint weights, gradient accumulation
    (True, 1),
    (False, 1),   # checkpoints that keep only the adapter
    (True, 2),
]

@pytest.mark.parametrize("full_weights,grad_accum", RESUME)
def test_resume_is_bit_identical(tmp_path, full_weights, grad_accum):
    "Stopped after step 3 and resumed from its checkpoint, with dropout and a schedule, a run ends as one never stopped."
    def run(out, resume=None, seed=0):
        m = lora_model(seed, dropout=0.1)
        t = trainer(m, out, [AdapterCallback(full_weights)], save_strategy="steps", save_steps=3, warmup_steps=2,
                    lr_scheduler_type="cosine", per_device_train_batch_size=4 // grad_accum, gradient_accumulation_steps=grad_accum)
        t.train(resume_from_checkpoint=resume)
        return trainable(m), [h["loss"] for h in t.state.log_history if "loss" in h]
    straight, losses = run(tmp_path/"a")
    resumed, resumed_losses = run(tmp_path/"b", resume=tmp_path/"a"/"checkpoint-3", seed=1)  # other initial weights
    assert resumed_losses == losses
    assert all(torch.equal(resumed[n], straight[n]) for n in straight)
    saved = load_file(tmp_path/"b"/"adapter_model.safetensors")
    assert all(torch.equal(saved["base_model.model." + n], straight[n]) for n in straight)

OTHER_METHODS = [  # method, options: a base that the init rewrote (saved with the adapter), a method that is not LoRA
    ("lora", dict(r=4, init="pissa")),
    ("ia3", dict()),
]

@pytest.mark.parametrize("method,options", OTHER_METHODS)
def test_other_methods_resume_from_adapter_only_checkpoints(tmp_path, method, options):
    def run(out, resume=None, seed=0):
        torch.manual_seed(seed)
        m = apply(tiny_llama(), method, targets="all-linear", **options)
        trainer(m, out, [AdapterCallback(full_weights=False)], max_steps=4, save_strategy="steps", save_steps=2).train(resume_from_checkpoint=resume)
        return m
    straight = run(tmp_path/"a")
    state = training_state(straight)
    assert set(load_file(tmp_path/"a"/"checkpoint-2"/"model.safetensors")) == set(state)
    if options.get("init") == "pissa": assert any(".base_layer." in k for k in state)  # the residual base travels too
    resumed = run(tmp_path/"b", resume=tmp_path/"a"/"checkpoint-2", seed=1)
    assert all(torch.equal(p, state[n]) for n, p in training_state(resumed).items())
    x = torch.randint(0, 49152, (2, 10), generator=torch.Generator().manual_seed(0))
    assert torch.equal(load_adapter(tiny_llama(), tmp_path/"a").eval()(x).logits, straight.eval()(x).logits)

class FirstGrads(TrainerCallback):
    "The adapter's gradients of the first optimiser step."
    grads = None
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None: self.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

def first_grads(tmp_path, model=None, callbacks=(), **kw):
    grads = FirstGrads()
    trainer(model or lora_model(dropout=0.1), tmp_path, [grads, *callbacks], max_steps=1, max_grad_norm=0, **kw).train()
    return grads.grads

@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, reentrant):
    off = first_grads(tmp_path/"off")
    on = first_grads(tmp_path/"on", **{GC: True, f"{GC}_kwargs": {"use_reentrant": reentrant}})
    assert on.keys() == off.keys()
    for n in off: assert_close(on[n], off[n], msg=n)

def checkpointed_by_hand():
    "Reentrant checkpointing without the input-grad hook, as transformers 4.x left a model that is not a PEFT model."
    m = lora_model(dropout=0.1)
    m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    m.disable_input_require_grads()
    return m

def test_reentrant_checkpointing_without_the_hook_is_fixed_by_the_callback(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "None of the inputs have requires_grad=True"
        with pytest.raises(RuntimeError, match="does not require grad"): first_grads(tmp_path/"plain", checkpointed_by_hand())
    m = checkpointed_by_hand()
    got = first_grads(tmp_path/"callback", m, [AdapterCallback()])
    assert checkpointing(m) and has_input_grads(m)
    off = first_grads(tmp_path/"off")
    for n in off: assert_close(got[n], off[n], msg=n)

def test_prepare_for_trainer():
    m = prepare_for_trainer(lora_model(), gradient_checkpointing=True)
    assert checkpointing(m) and has_input_grads(m) and not m.config.use_cache
    m = prepare_for_trainer(lora_model())
    assert not checkpointing(m) and not has_input_grads(m)     # nothing asked, nothing on: nothing changed
    hooks = prepare_for_trainer(prepare_for_trainer(lora_model(), gradient_checkpointing=True))._require_grads_hooks
    assert len(hooks) == 1                                        # preparing twice adds no second hook

class NoEmbeddings(nn.Module):
    "A model with a peftlab method and layers that could be checkpointed, but no input embeddings to hook."
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

BAD = [  # model, arguments, error, message
    (lambda: tiny_llama(), dict(gradient_checkpointing=True), ValueError, "peftlab.apply"),
    (lambda: tiny_llama(), dict(), ValueError, "peftlab.apply"),
    (lambda: apply(NoEmbeddings(), "lora", r=2, targets=["proj"]), dict(gradient_checkpointing=True), TypeError, "use_reentrant': False"),
]

@pytest.mark.parametrize("make,kw,error,message", BAD)
def test_prepare_for_trainer_refuses_clearly(make, kw, error, message):
    m = make()
    before = {n: p.clone() for n, p in m.named_parameters()}
    with pytest.raises(error, match=message): prepare_for_trainer(m, **kw)
    assert not checkpointing(m) and not has_input_grads(m)
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())

def test_trainer_and_fit_train_the_same_adapter(tmp_path):
    "Same start, same batches in order, AdamW at a constant rate: the same losses (1e-5) and adapters (float32 rounding, below 2e-3 of their norm)."
    a, b = lora_model(), lora_model()
    t = trainer(a, tmp_path, max_steps=8, lr_scheduler_type="constant", optim="adamw_torch", train_sampling_strategy="sequential")
    t.train()
    log = fit(b, sft_loader(examples(), tok(), batch_size=4, shuffle=False), steps=8, lr=1e-2, warmup=0, schedule="constant", progress=False)
    losses = [h["loss"] for h in t.state.log_history if "loss" in h]
    assert len(losses) == 8 and all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(losses, log.losses))
    pb = trainable(b)
    gaps = {n: ((p - pb[n]).norm() / pb[n].norm()).item() for n, p in trainable(a).items()}
    assert max(gaps.values()) < 2e-3, max(gaps.items(), key=lambda kv: kv[1])  # Adam's 1/sqrt(v) amplifies last-bit differences

# --- TRL's SFTTrainer ---

def test_sft_trainer_tokenizes_like_peftlab(tmp_path):
    "TRL's rows from prompt-completion data are encode_example's plus the newline the template writes after <|im_end|>."
    t = sft_trainer(lora_model(), tmp_path, prompt_completion_dataset(examples()))
    assert len(t.train_dataset) == len(examples())
    for row, ex in zip(t.train_dataset, examples()):
        mine = encode_example(ex, tok())
        assert row["input_ids"][:-1] == mine["input_ids"] and row["labels"][:-1] == mine["labels"]
        assert tok().decode(row["input_ids"][-1]) == "\n" and row["labels"][-1] == row["input_ids"][-1]
    t = sft_trainer(lora_model(), tmp_path, dataset())           # tokenized rows are used as they are
    assert t.train_dataset.column_names == ["input_ids", "labels"] and t.train_dataset[:] == dataset()[:]

def test_sft_trainer_trains_only_the_adapter(tmp_path):
    m = lora_model()
    base, start = frozen(m), trainable(m)
    t = sft_trainer(m, tmp_path, prompt_completion_dataset(examples()), [AdapterCallback()], max_steps=8, save_strategy="steps", save_steps=4)
    before = t.evaluate()["eval_loss"]
    t.train()
    after = t.evaluate()["eval_loss"]
    assert after < before - 0.1, (before, after)
    assert t.args.gradient_checkpointing and checkpointing(m) and has_input_grads(m)   # SFTConfig's default
    assert all(torch.equal(p, base[n]) for n, p in frozen(m).items())
    assert all(not torch.equal(p, start[n]) for n, p in trainable(m).items())
    x = torch.randint(0, 49152, (2, 10), generator=torch.Generator().manual_seed(0))
    m.eval()
    for d in (tmp_path, tmp_path/"checkpoint-8"):
        assert torch.equal(load_adapter(tiny_llama(), d).eval()(x).logits, m(x).logits)

def test_sft_trainer_resume_is_bit_identical(tmp_path):
    def run(out, resume=None, seed=0):
        m = lora_model(seed, dropout=0.1)
        t = sft_trainer(m, out, dataset(), [AdapterCallback(full_weights=False)], save_strategy="steps", save_steps=3)
        t.train(resume_from_checkpoint=resume)
        return trainable(m)
    straight = run(tmp_path/"a")
    resumed = run(tmp_path/"b", resume=tmp_path/"a"/"checkpoint-3", seed=1)
    assert all(torch.equal(resumed[n], straight[n]) for n in straight)

def test_sft_trainer_on_sft_dataset_trains_as_trainer(tmp_path):
    "peftlab's tokenized rows in SFTTrainer and in Trainer: the same adapter to float32 rounding."
    same = dict(max_steps=8, optim="adamw_torch", train_sampling_strategy="sequential")
    a, b = lora_model(), lora_model()
    trainer(a, tmp_path/"hf", **same).train()
    sft_trainer(b, tmp_path/"trl", dataset(), gradient_checkpointing=False, **same).train()
    pb = trainable(b)
    gaps = {n: ((p - pb[n]).norm() / pb[n].norm()).item() for n, p in trainable(a).items()}
    assert max(gaps.values()) < 2e-3, max(gaps.items(), key=lambda kv: kv[1])

# --- two processes (CPU, gloo) ---

DDP = dict(max_steps=4, save_strategy="steps", save_steps=2, optim="adamw_torch", train_sampling_strategy="sequential")

def ddp_worker(out):
    "One rank of `test_adapter_callback_under_ddp`: 2 rows per rank, 4 per step in all."
    m = lora_model()
    t = trainer(m, out, [AdapterCallback()], per_device_train_batch_size=2, **DDP)
    t.train()
    torch.save(trainable(m), Path(out)/f"rank{t.args.process_index}.pt")

def test_adapter_callback_under_ddp(tmp_path):
    "Under torchrun the ranks agree, the adapter is written into every checkpoint, and it is the one-process run's at the same global batch."
    r = torchrun(__file__, nproc=2, args=[tmp_path], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(tmp_path/f"rank{i}.pt") for i in (0, 1)]
    assert all(torch.equal(ranks[0][n], ranks[1][n]) for n in ranks[0])
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path/"checkpoint-2").iterdir()}
    one = lora_model()
    trainer(one, tmp_path/"one", per_device_train_batch_size=4, **DDP).train()
    x = torch.randint(0, 49152, (2, 10), generator=torch.Generator().manual_seed(0))
    loaded = load_adapter(tiny_llama(), tmp_path).eval()
    for n, p in trainable(loaded).items(): assert torch.equal(p, ranks[0][n])
    gaps = {n: ((p - ranks[0][n]).norm() / p.norm()).item() for n, p in trainable(one).items()}
    assert max(gaps.values()) < 2e-3, max(gaps.items(), key=lambda kv: kv[1])

if __name__ == "__main__": ddp_worker(sys.argv[1])
