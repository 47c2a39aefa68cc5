"""A run killed with SIGKILL while it writes a checkpoint resumes from the last complete one and ends bit-identical.

The kill is real: the child process (or one rank of a 2-process torchrun job) sends itself SIGKILL in the middle of
writing `trainable.safetensors` (half the file on disk), or at the barrier where the other ranks wait for the writer.
This module is also the script the children run (see `main`).
"""
import os, signal, subprocess, sys
from pathlib import Path
import pytest, torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
import peftlab as pl
import peftlab.core.train as T
from peftlab.core.train import fit, trainable_parameters, checkpoints, PARAMS_FILE
from peftlab.core.distributed import torchrun, rank, is_main_process, full_state_dict

STEPS, EVERY, KILL = 6, 2, 4  # checkpoints after steps 2, 4, 6; the write of step 4's is killed

def batches():
    g = torch.Generator().manual_seed(2)
    out = []
    for lengths in ([2, 9, 4, 1], [7, 3, 12, 5]):
        x = torch.randint(0, 49152, (4, 16), generator=g)
        keep = torch.arange(16) >= 16 - torch.tensor(lengths)[:, None]
        out.append(dict(input_ids=x, attention_mask=torch.ones_like(x), labels=x.masked_fill(~keep, -100)))
    return out

def lora_model(seed=0):
    torch.manual_seed(seed)
    return pl.apply(pl.tiny_llama(), "lora", r=4, targets="all-linear", dropout=0.1)  # dropout: the RNG states matter

def run(directory, resume=False):
    "The run: 6 steps, grad_accum 2, a checkpoint every 2; its losses and final adapter."
    m = lora_model(seed=1 if resume else 0)  # a resumed run starts from other weights: the checkpoint overwrites them
    log = fit(m, batches(), steps=STEPS, lr=1e-2, grad_accum=2, checkpoint_dir=directory, checkpoint_every=EVERY,
              resume=resume, progress=False)
    return dict(losses=log.losses, state=full_state_dict(m))

def arm(kill_rank):
    "Make rank `kill_rank` SIGKILL itself during step KILL's checkpoint: mid-file if it writes, else at the barrier."
    real_save, real_barrier, real_checkpoint = T.save_file, T.barrier, T.save_checkpoint
    armed = []
    def save_checkpoint(directory, state, *a, **k):
        if state.step == KILL and rank() == kill_rank: armed.append(True)
        return real_checkpoint(directory, state, *a, **k)
    def save_file(tensors, path):
        real_save(tensors, path)
        if armed:  # half the file is on disk when the process dies
            data = Path(path).read_bytes(); Path(path).write_bytes(data[:len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
    def barrier():
        if armed: os.kill(os.getpid(), signal.SIGKILL)  # the writer (rank 0) is writing now
        real_barrier()
    T.save_checkpoint, T.save_file, T.barrier = save_checkpoint, save_file, barrier

def main(mode, directory, out=None, kill_rank="0"):
    torch.set_num_threads(1)
    if mode == "killed":
        arm(int(kill_rank)); run(directory)
        raise SystemExit("the run was not killed")
    res = dict(resumed=run(directory, resume=True), straight=run(Path(directory).parent / "straight"))
    if is_main_process(): torch.save(res, out)

# ---------------------------------------------------------------- the tests

def same(a, b):
    assert a["losses"] == b["losses"]
    assert set(a["state"]) == set(b["state"]) and all(torch.equal(a["state"][n], b["state"][n]) for n in a["state"])

def test_sigkill_one_process(tmp_path):
    d = tmp_path / "run"
    r = subprocess.run([sys.executable, __file__, "killed", d], capture_output=True, text=True, timeout=240,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert [p.name for p in checkpoints(d)] == ["step-00000002"]               # the half-written step 4 is not a checkpoint
    partial = list(d.glob(".step-00000004.*.tmp"))
    assert len(partial) == 1 and (partial[0] / PARAMS_FILE).exists()          # ... though half of it is on disk
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed child ran: bit-identity needs the same reduction order (pytest may hold 2 threads)
    try: same(run(d, resume=True), run(tmp_path / "straight"))
    finally: torch.set_num_threads(threads)
    assert sorted(p.name for p in d.iterdir()) == ["step-00000006"]            # the leftover is cleaned up

@pytest.mark.parametrize("kill_rank", [0, 1])
def test_sigkill_one_rank_of_two(tmp_path, kill_rank):
    "Rank 0 killed while writing (half a file), or rank 1 killed while rank 0 writes: resume on 2 ranks ends bit-identical."
    d = tmp_path / "run"
    r = torchrun(__file__, nproc=2, args=["killed", d, "-", kill_rank], timeout=240)
    assert r.returncode != 0 and "the run was not killed" not in r.stderr, r.stderr[-3000:]
    assert "Signals.SIGKILL" in r.stderr or "SIGKILL" in r.stderr or "exitcode  : -9" in r.stderr, r.stderr[-3000:]
    done = [p.name for p in checkpoints(d)]
    if kill_rank == 0: assert done == ["step-00000002"] and list(d.glob(".step-00000004.*.tmp"))
    else: assert done in (["step-00000002"], ["step-00000004"])  # rank 0 may finish its write before it is stopped
    out = tmp_path / "out.pt"
    r = torchrun(__file__, nproc=2, args=["resume", d, out], timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    res = torch.load(out, weights_only=False)
    same(res["resumed"], res["straight"])

if __name__ == "__main__": main(*sys.argv[1:])
