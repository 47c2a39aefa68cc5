"""peftlab's GaLore equals galore-torch's, step by step, on tiny-llama.

Each row builds `pl.make_optimizer(model, name, ...)` on one copy of tiny-llama and the reference optimiser on
another, with the same parameter groups (ours, options included, handed to the reference), and trains both on
the same batches for 20 steps with a projector refresh every 5 steps (moments carried across subspace changes)
and weight decay on. Every parameter must agree to 1e-5. The 8-bit rows run galore-torch's `GaLoreAdamW8bit`
on bitsandbytes' CPU 8-bit Adam, with its one `torch.cuda.synchronize()` call made a no-op.
"""
from unittest import mock
import pytest
import torch
import peftlab as pl
from galore_torch import GaLoreAdamW as ReferenceGaLoreAdamW, GaLoreAdamW8bit as ReferenceGaLoreAdamW8bit
from peftlab.core.models import tiny_llama, load_tokenizer
from peftlab.core.data import get_task, sft_loader
from peftlab.core.testing import assert_close

torch.set_num_threads(1)
KEEP = ("lr", "betas", "eps", "weight_decay", "rank", "update_proj_gap", "scale", "proj_type")
# (name, our options, the reference's constructor); rank 8 is below every weight's smaller side (32)
CASES = [(f"galore-{t}", "galore", dict(proj_type=t), lambda g: ReferenceGaLoreAdamW(g, lr=1e-3, no_deprecation_warning=True))
         for t in ("std", "reverse_std", "left", "right", "full")]
CASES += [("galore-8bit-std", "galore-8bit", dict(min_8bit_size=256), lambda g: ReferenceGaLoreAdamW8bit(g, lr=1e-3, min_8bit_size=256)),
          ("galore-8bit-full", "galore-8bit", dict(proj_type="full", min_8bit_size=64), lambda g: ReferenceGaLoreAdamW8bit(g, lr=1e-3, min_8bit_size=64))]


@pytest.fixture(scope="module")
def batches():
    tok = load_tokenizer("tiny-llama")
    return list(sft_loader(get_task("record_format", n_train=40, n_test=4, seed=0).train, tok, batch_size=4, shuffle=False))


def reference_groups(opt, model):
    params = dict(model.named_parameters())
    return [{"params": [params[n] for n in g["param_names"]], **{k: g[k] for k in KEEP if k in g}} for g in opt.param_groups]


@pytest.mark.parametrize("case,name,options,reference", CASES, ids=[c[0] for c in CASES])
def test_equals_galore_torch(case, name, options, reference, batches):
    a, b = tiny_llama(), tiny_llama()
    ours = pl.make_optimizer(a, name, lr=1e-3, weight_decay=0.01, rank=8, update_proj_gap=5, **options)
    theirs = reference(reference_groups(ours, b))
    with mock.patch("torch.cuda.synchronize"):
        for i in range(20):
            for model, opt in ((a, ours), (b, theirs)):
                model(**batches[i % len(batches)]).loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert_close(p, q, rtol=1e-5, atol=1e-5, msg=f"{case}: {n}")
    if "8bit" in name:  # the projected moments really were 8-bit
        assert ours.state[a.model.layers[0].mlp.up_proj.weight]["m"].dtype == torch.uint8
