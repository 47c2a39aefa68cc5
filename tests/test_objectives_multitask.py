"MFTCoder's FAMO weights live across steps: a run resumed from a checkpoint equals the run that never stopped."
import tempfile
import pytest
import torch
import peftlab as pl
from peftlab.core.models import tiny_llama
import peftlab.objectives.multitask  # registers the objectives

def batch(i:int)->dict:
    "Rows of two tasks, task 1 in every other row; seeded by the batch index."
    ids = torch.randint(3, 24, (6, 8), generator=torch.Generator().manual_seed(i))
    return dict(input_ids=ids, labels=ids.masked_fill(torch.arange(8) < 3, -100), task_id=torch.tensor([0, 1] * 3))

def run(steps:int, balance:str, **kw):
    torch.manual_seed(0)
    m = pl.apply(tiny_llama(vocab_size=24), "lora", r=4)
    log = pl.fit(m, batch, steps, lr=1e-2, warmup=0, schedule="constant", objective="mftcoder",
                 objective_options=dict(balance=balance, num_tasks=2), progress=False, **kw)
    return log, m

@pytest.mark.filterwarnings("ignore:the checkpoint was written")  # 2 steps, then resumed to 4: on purpose
@pytest.mark.parametrize("balance", ["famo", "token"])
def test_resume_is_exact(balance):
    straight, m1 = run(4, balance)
    with tempfile.TemporaryDirectory() as d:
        run(2, balance, checkpoint_dir=d, checkpoint_every=2)
        resumed, m2 = run(4, balance, checkpoint_dir=d, resume=True)
    assert resumed.losses == straight.losses
    for p, q in zip(m1.parameters(), m2.parameters()): assert torch.equal(p, q)

def test_famo_weights_are_logged_and_move():
    log, _ = run(4, "famo")
    rows = [r for r in log.rows if "weight_task0" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["weight_task0"] != 0.5 and abs(rows[-1]["weight_task0"] + rows[-1]["weight_task1"] - 1) < 1e-6
