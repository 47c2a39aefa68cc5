"""Gradient accumulation is exact: k batches of b rows make the update of one batch of k*b rows, whatever the answer lengths."""
import os
import pytest, torch
import torch.nn.functional as F
os.environ.setdefault("OMP_NUM_THREADS", "1")
import peftlab as pl
from peftlab.core.train import fit, Callback, trainable_parameters, loss_sum

SEQ = 24

def batches(lengths_per_batch, seed=0):
    "Batches whose rows supervise only their last `lengths[i]` tokens."
    g = torch.Generator().manual_seed(seed)
    out = []
    for lengths in lengths_per_batch:
        x = torch.randint(0, 49152, (len(lengths), SEQ), generator=g)
        keep = torch.arange(SEQ) >= SEQ - torch.tensor(lengths)[:, None]
        out.append(dict(input_ids=x, attention_mask=torch.ones_like(x), labels=x.masked_fill(~keep, -100)))
    return out

def concat(bs): return {k: torch.cat([b[k] for b in bs]) for k in bs[0]}

def lora():
    torch.manual_seed(0)
    m = pl.apply(pl.tiny_llama(), "lora", r=4, targets="all-linear")
    torch.manual_seed(1)
    for n, p in trainable_parameters(m):
        if "lora_B" in n: torch.nn.init.normal_(p, std=0.05)  # every matrix gets a gradient
    return m

def params(m): return {n: p.detach().clone() for n, p in trainable_parameters(m)}

SGD = dict(optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0), warmup=0, max_grad_norm=None, progress=False)
LENGTHS = [[1, 2], [23, 20], [1, 1], [17, 9]]  # 1 to 23 supervised tokens a row

def assert_same(a, b, atol=1e-5):
    for n in a: torch.testing.assert_close(a[n], b[n], atol=atol, rtol=1e-5, msg=n)

@pytest.mark.parametrize("k", [2, 4])
def test_accumulated_equals_one_big_batch(k):
    bs = batches(LENGTHS[:k])
    ma, mb = lora(), lora()
    la = fit(ma, bs, steps=1, grad_accum=k, **SGD)
    lb = fit(mb, [concat(bs)], steps=1, **SGD)
    assert_same(params(ma), params(mb))
    assert la.losses[0] == pytest.approx(lb.losses[0], abs=1e-5)  # logged: the per-token mean over the whole step

def test_a_mean_of_means_would_differ():
    "The test above can fail: averaging each batch's own mean gives a gradient far from the step's per-token one here."
    from peftlab.core.train import compute_loss
    bs = batches(LENGTHS[:2])
    exact, means = lora(), lora()
    sum(loss_sum(exact, b)[0] for b in bs).div(sum(loss_sum(exact, b)[1] for b in bs)).backward()
    (sum(compute_loss(means, b) for b in bs) / 2).backward()
    g, h = [torch.cat([p.grad.flatten() for _, p in trainable_parameters(m)]) for m in (exact, means)]
    assert (g - h).norm() > 0.2 * g.norm()

def test_matches_transformers_num_items_in_batch():
    "transformers' own exact accumulation (loss summed, divided by `num_items_in_batch`) gives the same gradient."
    bs = batches(LENGTHS)
    class Grads(Callback):
        def after_backward(self, s): self.g = {n: p.grad.clone() for n, p in trainable_parameters(s.model)}
    cb = Grads()
    fit(lora(), bs, steps=1, grad_accum=4, callbacks=[cb], **SGD)
    m = lora()
    n_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in bs)
    for b in bs: m(**b, num_items_in_batch=n_items).loss.backward()
    for n, p in trainable_parameters(m): torch.testing.assert_close(cb.g[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)

def ce_sum(logits, labels, batch):
    "A token-level objective that reports its count: exact normalisation."
    t = labels[:, 1:]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), t.flatten(), reduction="sum"), int((t != -100).sum())

def ce_mean(logits, labels, batch):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())

def test_objective_with_count_is_exact():
    bs = batches(LENGTHS[:2])
    ma, mb, mc = lora(), lora(), lora()
    fit(ma, bs, steps=1, grad_accum=2, objective=ce_sum, **SGD)
    fit(mb, [concat(bs)], steps=1, objective=ce_sum, **SGD)
    fit(mc, bs, steps=1, grad_accum=2, **SGD)  # = the default loss
    assert_same(params(ma), params(mb)); assert_same(params(ma), params(mc))

def test_scalar_objective_is_a_mean_over_rows():
    "A scalar objective is weighted by its batch's rows: batches of 1 and 3 rows give the 4-row batch's mean of row means."
    def row_mean(logits, labels, batch):
        t = labels[:, 1:]
        per_tok = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), t, reduction="none")
        return (per_tok.sum(1) / (t != -100).sum(1)).mean()   # mean over rows of each row's mean
    x = batches([[1, 5, 9, 20]])[0]
    bs = [{k: v[:1] for k, v in x.items()}, {k: v[1:] for k, v in x.items()}]
    ma, mb = lora(), lora()
    fit(ma, bs, steps=1, grad_accum=2, objective=row_mean, **SGD)
    fit(mb, [x], steps=1, objective=row_mean, **SGD)
    assert_same(params(ma), params(mb))

def test_no_supervised_tokens_is_a_clear_error():
    b = batches([[1, 1]])[0]
    b["labels"][:] = -100
    with pytest.raises(ValueError, match="has no supervised tokens"): fit(lora(), [b], steps=1, progress=False)

def test_a_batch_without_tokens_in_a_step_is_fine():
    "One batch of the step supervises nothing: it adds nothing (no NaN), the other carries the step."
    bs = batches([[3, 4], [2, 2]])
    bs[1]["labels"][:] = -100
    ma, mb = lora(), lora()
    fit(ma, bs, steps=1, grad_accum=2, **SGD)
    fit(mb, [bs[0]], steps=1, **SGD)
    assert_same(params(ma), params(mb))
    s, n = loss_sum(lora(), bs[1])
    assert (s.item(), n) == (0.0, 0)
