"A run killed and resumed from its checkpoint gives bit-identical losses and parameters to one never stopped."
import functools, shutil
import pytest, torch
from safetensors.torch import save_file
from peftlab.core.models import tiny_llama, load_tokenizer
from peftlab.core.registry import apply
from peftlab.core.data import sft_loader, get_task
from peftlab.core.train import fit, Callback, checkpoints, trainable_parameters, PARAMS_FILE, TRAINER_FILE

STEPS = 10
FIT = dict(steps=STEPS, lr=1e-2, warmup=0.2, schedule="cosine", progress=False)

class Killed(Exception): pass

class Kill(Callback):
    "Simulate a crash once `n` steps are done (their checkpoints included), before step n+1 starts."
    def __init__(self, n): self.n = n
    def on_step_begin(self, state):
        if state.step == self.n: raise Killed(f"killed after step {state.step}")

def lora_model(seed=0):
    "tiny-llama with LoRA (dropout on, so the RNG states matter); `seed` sets the initial adapter weights."
    torch.manual_seed(seed)
    return apply(tiny_llama(), "lora", r=4, targets="all-linear", dropout=0.1)

def random_batches(n=3, batch_size=2, seq_len=8):
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 49152, (batch_size, seq_len), generator=g) for _ in range(n)]
    return [dict(input_ids=x, attention_mask=torch.ones_like(x), labels=x) for x in ids]

@functools.lru_cache
def examples(): return get_task("arithmetic", 6, 0, seed=0, digits=1).train  # short rows: a fast test

def make_data(kind):
    "A fresh data source, as a new process would build it: a list (cycled), a callable, or a shuffling DataLoader."
    if kind == "list": return random_batches()
    if kind == "callable": return lambda i: random_batches()[i % 3]
    if kind == "sft_loader": return sft_loader(examples(), load_tokenizer("tiny-llama"), batch_size=2, seed=0)  # 3 batches an epoch
    raise ValueError(kind)

def params(model): return {n: p.detach().clone() for n, p in trainable_parameters(model)}

@functools.lru_cache
def straight(grad_accum, kind, log_every=1):
    "The uninterrupted run: its losses, learning rates and final parameters."
    m = lora_model()
    log = fit(m, make_data(kind), grad_accum=grad_accum, log_every=log_every, **FIT)
    return log.losses, log.lrs, params(m)

CASES = [  # grad_accum, data, killed after step, checkpoint_every, log_every
    (1, "list", 6, 2, 1),        # killed right after a checkpoint
    (2, "list", 6, 2, 1),
    (1, "list", 7, 3, 1),        # killed between checkpoints: step 7 is trained again from step 6
    (1, "list", 5, 4, 3),        # resumed in the middle of a log row's window
    (2, "callable", 7, 2, 1),
    (2, "sft_loader", 5, 2, 1),  # a shuffling DataLoader (3 batches an epoch), resumed in its fourth epoch
]

@pytest.mark.parametrize("grad_accum,kind,kill,every,log_every", CASES)
def test_resume_is_bit_identical(tmp_path, grad_accum, kind, kill, every, log_every):
    kw = dict(FIT, grad_accum=grad_accum, log_every=log_every, checkpoint_dir=tmp_path, checkpoint_every=every)
    with pytest.raises(Killed): fit(lora_model(), make_data(kind), callbacks=[Kill(kill)], **kw)
    assert [p.name for p in checkpoints(tmp_path)] == [f"step-{kill // every * every:08d}"]
    resumed = lora_model(seed=1)  # other initial weights: the checkpoint must overwrite them
    log = fit(resumed, make_data(kind), resume=True, **kw)
    losses, lrs, final = straight(grad_accum, kind, log_every)
    assert log.losses == losses and log.lrs == lrs
    assert log.steps == [s for s in range(1, STEPS + 1) if s % log_every == 0 or s == STEPS]
    got = params(resumed)
    assert list(got) == list(final)
    assert all(torch.equal(got[n], final[n]) for n in final)

def test_extending_a_finished_run(tmp_path):
    "6 steps with checkpoints every 2, then resumed to 10, equals 10 straight (a constant schedule does not depend on the length)."
    kw = dict(FIT, schedule="constant", warmup=0, checkpoint_dir=tmp_path, checkpoint_every=2)
    fit(lora_model(), random_batches(), **dict(kw, steps=6))
    assert [p.name for p in checkpoints(tmp_path)] == ["step-00000006"]
    m = lora_model(seed=1)
    with pytest.warns(UserWarning, match="run of 6 steps"): log = fit(m, random_batches(), resume=True, **kw)
    ref = lora_model()
    ref_log = fit(ref, random_batches(), **dict(kw, checkpoint_dir=None, checkpoint_every=None))
    assert log.losses == ref_log.losses
    assert all(torch.equal(a, b) for a, b in zip(params(m).values(), params(ref).values()))

def test_interrupted_write_is_ignored(tmp_path):
    "A temporary directory left by a crash during a write is not a checkpoint; the previous one is used."
    kw = dict(FIT, checkpoint_dir=tmp_path, checkpoint_every=2)
    with pytest.raises(Killed): fit(lora_model(), random_batches(), callbacks=[Kill(5)], **kw)
    (tmp_path/".step-00000006.x1y2.tmp").mkdir()
    (tmp_path/".step-00000006.x1y2.tmp"/PARAMS_FILE).write_bytes(b"half a fi")
    assert [p.name for p in checkpoints(tmp_path)] == ["step-00000004"]
    m = lora_model(seed=1)
    assert fit(m, random_batches(), resume=True, **kw).losses == straight(1, "list")[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000010"]  # the leftover is cleaned up

def _truncate(path):
    data = path.read_bytes(); path.write_bytes(data[:len(data) // 2])

def _rename_param(ckpt):
    from safetensors.torch import load_file
    sd = load_file(ckpt/PARAMS_FILE)
    name = sorted(sd)[0]
    sd[name.replace("lora_A", "lora_Z")] = sd.pop(name)
    save_file(sd, ckpt/PARAMS_FILE)

def _reshape_param(ckpt):
    from safetensors.torch import load_file
    sd = load_file(ckpt/PARAMS_FILE)
    name = sorted(sd)[0]
    sd[name] = torch.zeros(3, 3)
    save_file(sd, ckpt/PARAMS_FILE)

CORRUPTIONS = [  # what is done to the checkpoint, what the error says
    (lambda c: _truncate(c/PARAMS_FILE), "is damaged or incomplete"),
    (lambda c: _truncate(c/TRAINER_FILE), "is damaged or incomplete"),
    (lambda c: (c/TRAINER_FILE).write_bytes(b"\x00" * 64), "is damaged or incomplete"),
    (lambda c: (c/PARAMS_FILE).unlink(), "is damaged or incomplete"),
    (_rename_param, "does not match the model's trainable parameters"),
    (_reshape_param, r"has shape \(3, 3\) there"),
    (lambda c: shutil.rmtree(c), "holds no checkpoint"),
]

@pytest.mark.parametrize("corrupt,message", CORRUPTIONS)
def test_damaged_checkpoint_errors_clearly(tmp_path, corrupt, message):
    kw = dict(FIT, steps=4, checkpoint_dir=tmp_path, checkpoint_every=2)
    fit(lora_model(), random_batches(), **kw)
    ckpt = checkpoints(tmp_path)[-1]
    corrupt(ckpt)
    m = lora_model(seed=1)
    before = params(m)
    with pytest.raises((RuntimeError, ValueError, FileNotFoundError), match=message) as e:
        fit(m, random_batches(), resume=True, **kw)
    if ckpt.exists(): assert str(ckpt) in str(e.value)
    assert all(torch.equal(before[n], p) for n, p in params(m).items())  # nothing half-loaded

def test_checkpoint_of_other_model(tmp_path):
    "Resuming a run of another method (other trainable parameters) names the mismatch."
    fit(lora_model(), random_batches(), **dict(FIT, steps=2, checkpoint_dir=tmp_path))
    other = apply(tiny_llama(), "lora", r=4, targets=["q_proj"])
    with pytest.raises(ValueError, match=r"unexpected \['model.layers.0.mlp.down_proj"):
        fit(other, random_batches(), resume=True, **dict(FIT, steps=4, checkpoint_dir=tmp_path))
