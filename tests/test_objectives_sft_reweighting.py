"OTR, SFTMix, PoFT and S3FT inside `fit`: seeded rollouts and mixup resume exactly, SFTMix's hook lives only as long as its runs, S3FT's batches train end to end."
import tempfile
import pytest, torch
import peftlab as pl
from peftlab.core.models import tiny_llama, load_tokenizer
from peftlab.core.data import get_task
from peftlab.core.train import fit
from peftlab.objectives.sft_reweighting import SFTMix, s3ft_examples, s3ft_batch

V = 24

def data(i:int)->dict:
    "Batch `i` of random 9-token rows, the last 5 supervised, half flagged confident."
    ids = torch.randint(3, V, (6, 9), generator=torch.Generator().manual_seed(i))
    return dict(input_ids=ids, labels=ids.masked_fill(torch.arange(9) < 4, -100), confident=torch.arange(6) % 2 == 0)

def run(objective:str, steps:int, **kw):
    torch.manual_seed(0)
    m = pl.apply(tiny_llama(vocab_size=V), "lora", r=4)
    log = fit(m, data, steps, lr=1e-2, objective=objective, warmup=0, schedule="constant", progress=False, **kw)
    return log.losses, m

@pytest.mark.filterwarnings("ignore:the checkpoint was written")   # the short run's schedule; constant here
def test_resume_is_exact_for_sampled_objectives():
    "OTR's rollouts and SFTMix's λ are seeded by the step, so a resumed run is the run that never stopped."
    for objective in ("otr", "sftmix"):
        with tempfile.TemporaryDirectory() as d:
            straight, m1 = run(objective, 4)
            run(objective, 2, checkpoint_dir=d, checkpoint_every=2)
            resumed, m2 = run(objective, 4, checkpoint_dir=d, resume=True)
        assert resumed == straight, objective
        for p, q in zip(m1.parameters(), m2.parameters()): assert torch.equal(p, q)

def test_sftmix_hook_lives_with_its_runs():
    "The output-head hook is removed when fit ends and comes back when the same objective trains again."
    m = pl.apply(tiny_llama(vocab_size=V), "lora", r=4)
    mix = SFTMix(m)
    head = m.get_output_embeddings()
    fit(m, data, 2, objective=mix, progress=False)
    assert mix.hook is None and not head._forward_pre_hooks
    fit(m, data, 2, objective=mix, progress=False)
    assert mix.metrics["pairs"] == 3 and not head._forward_pre_hooks

def test_s3ft_trains_on_prepared_text_examples():
    "s3ft_examples + s3ft_batch feed fit(objective='s3ft') on a bundled task; the log carries the share of own answers."
    tok = load_tokenizer("tiny-llama")
    task = get_task("arithmetic", n_train=4, n_test=1, seed=0)
    m = pl.apply(tiny_llama(), "lora", r=4)
    prepared = s3ft_examples(m, tok, task.train, "arithmetic", max_new_tokens=4)
    log = fit(m, [s3ft_batch(prepared, tok)], 2, objective="s3ft", progress=False)
    assert [r["self_share"] for r in log.rows if "self_share" in r] == [0.0, 0.0]   # a random model is never right
