"""peftlab's LOMO and AdaLomo (`peftlab.optim.lomo`) against the reference package `lomo-optim` (PyPI, dev oracle).

Each row trains tiny-llama for 20 steps from the same weights on the same batches with both implementations,
driven the way each is meant to be driven: ours by `loss.backward(); step(); zero_grad()` (its updates run in
post-accumulate-grad hooks), theirs by `fused_backward(loss, lr)`. With norm clipping both take two passes
(`grad_norm(loss)` first). lomo-optim's AdaLomo allocates its state with `.cuda()`; on a CPU-only machine it runs
with `Tensor.cuda` as the identity during construction (`cuda_as_identity`), nothing else changed.
Weights must agree to 1e-5 (LOMO without norm clipping: bit for bit); what differs is the order of floating-point
operations (lomo-optim scales the loss by 2**10 and back, sums the norm in float32). No float64 row: lomo-optim
computes every update in float32 whatever the weights' dtype.
"""
import pytest
import torch
import lomo_optim
from peftlab.core.models import tiny_llama, load_tokenizer
from peftlab.core.data import get_task, sft_loader
from peftlab.optim.lomo import Lomo, AdaLomo, cuda_as_identity

STEPS = 20
CASES = [  # (name, options, norm clip, dtype, tolerance)
    ("Lomo", dict(lr=1e-2), None, torch.float32, 0.0),
    ("Lomo", dict(lr=1e-2, weight_decay=0.1), None, torch.float32, 0.0),
    ("Lomo", dict(lr=1e-2, clip_grad_value=0.01), None, torch.float32, 0.0),
    ("Lomo", dict(lr=1e-2), 0.5, torch.float32, 1e-5),
    ("AdaLomo", dict(lr=1e-2), None, torch.float32, 1e-5),
    ("AdaLomo", dict(lr=1e-2, weight_decay=0.1, clip_threshold=0.5), None, torch.float32, 1e-5),
    ("AdaLomo", dict(lr=1e-2, clip_grad_value=0.01), 0.5, torch.float32, 1e-5),
]


@pytest.fixture(scope="module")
def batches():
    tok = load_tokenizer("tiny-llama")
    data = get_task("record_format", n_train=4 * STEPS, n_test=4, seed=0).train
    return list(sft_loader(data, tok, batch_size=4, shuffle=False, max_len=48))


def train_ours(name, options, clip, dtype, batches):
    model = tiny_llama(dtype=dtype).train()
    opt = {"Lomo": Lomo, "AdaLomo": AdaLomo}[name](model.parameters(), clip_grad_norm=clip, **options)
    for b in batches:
        loss = model(**b).loss
        if clip: opt.grad_norm(loss)
        loss.backward(); opt.step(); opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    return model


def train_theirs(name, options, clip, dtype, batches):
    model = tiny_llama(dtype=dtype).train()
    lr = options["lr"]
    with cuda_as_identity():
        opt = getattr(lomo_optim, name)(model, clip_grad_norm=clip, **options)
    for b in batches:
        loss = model(**b).loss
        if clip: opt.grad_norm(loss)
        opt.fused_backward(loss, lr)
    return model


@pytest.mark.parametrize("name,options,clip,dtype,tol", CASES)
def test_same_weights_as_lomo_optim(name, options, clip, dtype, tol, batches):
    ours, theirs = (train(name, options, clip, dtype, batches) for train in (train_ours, train_theirs))
    start = tiny_llama(dtype=dtype)
    for (n, a), b, s in zip(ours.named_parameters(), theirs.parameters(), start.parameters()):
        assert (a - b).abs().max().item() <= tol, n
    moved = max((a - s).abs().max().item() for a, s in zip(ours.parameters(), start.parameters()))
    assert moved > 1e-3  # the comparison is not of two idle models
