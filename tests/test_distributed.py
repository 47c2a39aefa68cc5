"""Two processes (CPU, gloo) train the same adapter as one process at the same global batch, and resume to the bit.

Run by pytest, this module launches itself under `torchrun --nproc_per_node 2` (see `worker`) once per engine,
and compares what rank 0 wrote with the same job run here in one process.
"""
import os, subprocess, sys
from pathlib import Path
import pytest, torch

OMP = os.environ.setdefault("OMP_NUM_THREADS", "1")
import peftlab as pl
from peftlab.core.train import fit, Callback, trainable_parameters, checkpoints
from peftlab.core.distributed import (torchrun, full_state_dict, is_main_process, world_size, rank, shard_batch,
                                      check_not_sharded, is_sharded, free_port)

SEQ, ROWS = 16, 4
ANSWERS = [[1, 15, 3, 9], [12, 2, 7, 1], [5, 5, 14, 2]]  # supervised tokens per row: rank 0 and rank 1 get unequal counts

def batches():
    "Global batches of 4 rows whose answers have very different lengths (the rest of each row is -100)."
    g = torch.Generator().manual_seed(1)
    out = []
    for lengths in ANSWERS:
        x = torch.randint(0, 49152, (ROWS, SEQ), generator=g)
        keep = torch.arange(SEQ) >= SEQ - torch.tensor(lengths)[:, None]
        out.append(dict(input_ids=x, attention_mask=torch.ones_like(x), labels=x.masked_fill(~keep, -100)))
    return out

def model(kind, dropout=0.0):
    torch.manual_seed(0)
    targets = ["q_proj", "v_proj", "down_proj"]
    if kind == "lora": return pl.apply(pl.tiny_llama(), "lora", r=4, targets=targets, dropout=dropout)
    if kind == "qlora": return pl.apply(pl.tiny_llama(), "qlora", backend="torch", r=4, targets=targets, dropout=dropout)
    raise ValueError(kind)

def nonzero_b(m):
    "B != 0 so that every adapter matrix gets a gradient in the first step."
    torch.manual_seed(1)
    for n, p in trainable_parameters(m):
        if "lora_B" in n: torch.nn.init.normal_(p, std=0.05)
    return m

# SGD without clipping: a wrong normalisation (a mean of means, a missing world factor) shows in the update,
# where Adam would hide a constant factor. The QLoRA job uses AdamW with clipping to cover that path.
JOBS = dict(lora=dict(kind="lora", optimizer=torch.optim.SGD, lr=0.5, max_grad_norm=None, grad_accum=1),
            lora_accum=dict(kind="lora", optimizer=torch.optim.SGD, lr=0.5, max_grad_norm=None, grad_accum=3),
            qlora=dict(kind="qlora", optimizer=None, lr=1e-2, max_grad_norm=0.05, grad_accum=1),
            lora_ckpt=dict(kind="lora", optimizer=torch.optim.SGD, lr=0.5, max_grad_norm=None, grad_accum=1, gradient_checkpointing=True))

def train(job, fsdp=False, steps=3):
    "One job: the losses and the adapter's (gathered) state."
    spec = dict(JOBS[job]); m = nonzero_b(model(spec.pop("kind")))
    log = fit(m, batches(), steps=steps, warmup=0, schedule="constant", progress=False, fsdp=fsdp, **spec)
    return dict(losses=log.losses, state=full_state_dict(m))

class Stop(Exception): pass

class StopAt(Callback):
    def __init__(self, n): self.n = n
    def on_step_begin(self, s):
        if s.step == self.n: raise Stop(f"stopped at {s.step}")

def resume_job(directory, fsdp=False):
    "Train 6 steps straight; then 6 steps stopped after step 4 (checkpoints every 2) and resumed: both results."
    kw = dict(steps=6, lr=1e-2, warmup=0.2, progress=False, fsdp=fsdp, grad_accum=2, checkpoint_every=2)
    straight = model("lora", dropout=0.1)
    log = fit(straight, batches(), checkpoint_dir=Path(directory, "straight"), **kw)
    stopped = Path(directory, "run")
    try: fit(model("lora", dropout=0.1), batches(), checkpoint_dir=stopped, callbacks=[StopAt(4)], **kw)
    except Stop: pass
    names = [p.name for p in checkpoints(stopped)]
    resumed = model("lora", dropout=0.1)
    with torch.no_grad():
        for _, p in trainable_parameters(resumed): p.add_(1.0)  # other weights: the checkpoint must overwrite them
    rlog = fit(resumed, batches(), checkpoint_dir=stopped, resume=True, **kw)
    return dict(losses=log.losses, state=full_state_dict(straight), resumed_losses=rlog.losses,
                resumed_state=full_state_dict(resumed), checkpoints=names)

def nf4_sharded():
    "QLoRA's NF4 codes under FSDP2: each rank's share of every layer's float storage, and gathered -> dequantised == unsharded."
    from peftlab.quant.qlora import NF4Linear, quantized_layers
    from peftlab.quant.nf4 import dequantize_nf4
    from peftlab.core.distributed import full_tensor
    m = model("qlora")
    ref = {n: l.dequantize() for n, l in quantized_layers(m).items()}
    fit(m, batches(), steps=1, fsdp=True, progress=False)
    out = {}
    for n, l in quantized_layers(m).items():
        storage = l.packed_storage                          # outside forward: this rank's shard (a DTensor)
        whole = full_tensor(storage)
        codes = whole.view(torch.uint8)[:l.packed_bytes].view(-1, 1)
        w = dequantize_nf4(codes, l.absmax_float(), l.shape, l.blocksize, l.compute_dtype)
        try: l.dequantize(); refused = ""
        except RuntimeError as e: refused = str(e)
        out[n] = dict(local=storage.to_local().numel(), whole=whole.numel(), dtype=whole.dtype, equal=torch.equal(w, ref[n]), refused=refused)
    return out

def worker(mode, out):
    "What each rank runs under torchrun; rank 0 saves the results to `out`."
    torch.set_num_threads(1)
    if mode == "accelerate":
        if is_main_process(): torch.save(dict(world=world_size(), lora=train("lora")), out)
        else: train("lora")
        return
    fsdp = mode == "fsdp"
    res = dict(world=world_size(), parity={job: train(job, fsdp) for job in JOBS},
               resume=resume_job(Path(out).parent, fsdp))
    if fsdp:
        m = model("lora"); fit(m, batches(), steps=1, fsdp=True, progress=False)
        res["sharded"] = all(is_sharded(p) for _, p in trainable_parameters(m))
        res["shard_rows"] = {n: p.to_local().shape[0] for n, p in trainable_parameters(m)}
        try: check_not_sharded(dict(trainable_parameters(m))["model.layers.0.self_attn.q_proj.lora_A.weight"], "merge of q_proj")
        except RuntimeError as e: res["refused"] = str(e)
        res["nf4"] = nf4_sharded()
    if is_main_process(): torch.save(res, out)

# ---------------------------------------------------------------- the tests (pytest, one process here)

def launch(tmp, mode):
    out = Path(tmp, f"{mode}.pt")
    r = torchrun(__file__, nproc=2, args=[mode, out], timeout=240)
    assert r.returncode == 0, f"torchrun failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return torch.load(out, weights_only=False)

@pytest.fixture(scope="module")
def ddp(tmp_path_factory): return launch(tmp_path_factory.mktemp("ddp"), "ddp")

@pytest.fixture(scope="module")
def fsdp(tmp_path_factory): return launch(tmp_path_factory.mktemp("fsdp"), "fsdp")

@pytest.fixture(scope="module")
def single():
    "The same jobs in this one process."
    return {job: train(job) for job in JOBS}

def assert_same_adapter(a, b, atol=1e-5):
    assert set(a) == set(b) and len(a) > 0
    for n in a: torch.testing.assert_close(a[n], b[n], atol=atol, rtol=1e-5, msg=n)

@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
@pytest.mark.parametrize("job", list(JOBS))
def test_two_ranks_equal_one_process(request, single, engine, job):
    """2 ranks x 2 rows equal 1 process x 4 rows (answers of 1 to 15 tokens, so each rank's token count differs), with DDP
    and sharded with FSDP2 over a CPU mesh of 2 (the QLoRA base's NF4 codes stay whole buffers on each rank)."""
    run = request.getfixturevalue(engine)
    assert run["world"] == 2
    assert_same_adapter(run["parity"][job]["state"], single[job]["state"])
    assert run["parity"][job]["losses"] == pytest.approx(single[job]["losses"], abs=1e-5)
    moved = [p for n, p in single[job]["state"].items() if "lora_B" in n]
    assert any((p.abs() > 0.06).any() for p in moved)  # it moved: B started at N(0, 0.05^2)

def test_checkpointing_changes_nothing(single):
    assert_same_adapter(single["lora_ckpt"]["state"], single["lora"]["state"], atol=1e-6)

def test_fsdp_shards_and_refuses(fsdp):
    "Every trainable parameter is a DTensor holding half of its rows; reading one whole is refused with the fix."
    assert fsdp["sharded"]
    assert fsdp["shard_rows"]["model.layers.0.self_attn.q_proj.lora_A.weight"] == 2   # r=4 rows over 2 ranks
    assert "FSDP2 DTensor shard" in fsdp["refused"] and "gather it first" in fsdp["refused"]

def test_fsdp_shards_nf4_codes(fsdp):
    "QLoRA's packed NF4 codes live in float32 storage that FSDP shards; gathered and dequantised, they are the unsharded weight."
    nf4 = fsdp["nf4"]
    assert len(nf4) == 6  # q, v, down projections of 2 layers
    for n, r in nf4.items():
        assert r["dtype"] == torch.float32 and r["equal"], n
        assert r["local"] == -(-r["whole"] // 2), n              # half of it on this rank
        assert "gather it first" in r["refused"], n              # reading the codes whole outside forward is refused

@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_resume_is_bit_identical(request, mode):
    "Stopped after step 4 (checkpoint at 4), resumed on 2 ranks: the same losses and adapter, to the bit, as 6 straight steps."
    res = request.getfixturevalue(mode)["resume"]
    assert res["checkpoints"] == ["step-00000004"]
    assert res["resumed_losses"] == res["losses"]
    assert set(res["resumed_state"]) == set(res["state"])
    assert all(torch.equal(res["resumed_state"][n], res["state"][n]) for n in res["state"])

def test_accelerate_launch_equals_one_process(tmp_path, single):
    "`accelerate launch` starts the ranks as torchrun does; `fit` needs no Accelerator. (`--cpu` would start one process"
    " in accelerate 1.x without MPI; `--multi_gpu` with no GPU visible runs torchrun's launcher, and `fit` picks gloo.)"
    out = tmp_path / "acc.pt"
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), __file__, "accelerate", out]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr[-4000:]
    res = torch.load(out, weights_only=False)
    assert res["world"] == 2
    assert_same_adapter(res["lora"]["state"], single["lora"]["state"])

def test_fsdp_in_one_process_equals_plain(single):
    "fsdp=True without a launcher shards over a mesh of one rank: the same numbers."
    import torch.distributed as dist
    try:
        got = train("lora", fsdp=True)
        assert_same_adapter(got["state"], single["lora"]["state"])
    finally:
        if dist.is_initialized(): dist.destroy_process_group()

def test_bad_input():
    with pytest.raises(ValueError, match="batch size is global"): shard_batch(dict(input_ids=torch.ones(1, 3)), 0, 2)
    with pytest.raises(ValueError, match="class or a factory"):
        fit(model("lora"), batches(), steps=1, fsdp=True, optimizer=torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1))

if __name__ == "__main__": worker(*sys.argv[1:])
