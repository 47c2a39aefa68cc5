"""MeZO (`peftlab.optim.mezo`) against the reference's code path, and MeZO and its family (`peftlab.optim.zo`) under `fit`.

The reference (princeton-nlp/MeZO, `large_models/trainer.py`) is not a package: `Reference` below writes out its
`zo_perturb_parameters`, `zo_step` and `zo_update` as they are there (global `torch.manual_seed`, `param.data = ...`
assignments, weight decay skipped by name for biases and layer norms). Each row runs a few steps of both on the
same seeds and compares losses and parameters to 1e-6, and the projected gradients to what the difference
quotient allows (a last-bit difference in a loss is magnified by 1/2ε).
"""
import pytest
import torch
from torch import nn
from peftlab.core.models import tiny_llama, load_tokenizer
from peftlab.core.data import get_task, sft_loader
from peftlab.core.registry import apply
from peftlab.core.train import fit, compute_loss, seed_everything, Callback
from peftlab.optim.mezo import MeZO


class Reference:
    "MeZO's trainer methods, written out (the seed is passed in instead of drawn with np.random.randint)."
    def __init__(self, model, lr, eps, weight_decay):
        self.model, self.lr, self.zo_eps, self.weight_decay = model, lr, eps, weight_decay

    def zo_perturb_parameters(self, random_seed=None, scaling_factor=1):
        torch.manual_seed(random_seed if random_seed is not None else self.zo_random_seed)
        for name, param in self.named_parameters_to_optim:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
            param.data = param.data + scaling_factor * z * self.zo_eps

    def zo_forward(self, closure):
        with torch.inference_mode(): return closure().detach()

    def zo_step(self, closure, seed):
        self.named_parameters_to_optim = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.zo_random_seed = seed
        self.zo_perturb_parameters(scaling_factor=1)
        loss1 = self.zo_forward(closure)
        self.zo_perturb_parameters(scaling_factor=-2)
        loss2 = self.zo_forward(closure)
        self.projected_grad = ((loss1 - loss2) / (2 * self.zo_eps)).item()
        self.zo_perturb_parameters(scaling_factor=1)
        return loss1

    def zo_update(self):
        torch.manual_seed(self.zo_random_seed)
        for name, param in self.named_parameters_to_optim:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
            if "bias" not in name and "layer_norm" not in name and "layernorm" not in name:
                param.data = param.data - self.lr * (self.projected_grad * z + self.weight_decay * param.data)
            else:
                param.data = param.data - self.lr * (self.projected_grad * z)


class Small(nn.Module):
    "Names on which the reference's by-name weight-decay rule and ours (matrices only) agree."
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8); self.layer_norm = nn.LayerNorm(8); self.out = nn.Linear(8, 3)
    def forward(self, x): return self.out(torch.tanh(self.layer_norm(self.fc(x))))


def _batch():
    tok = load_tokenizer("tiny-llama")
    return next(iter(sft_loader(get_task("arithmetic", n_train=4, n_test=2, seed=0).train, tok, batch_size=2, shuffle=False)))

def _tiny(kind):
    if kind == "lora": return apply(tiny_llama(), "lora", r=4, dropout=0.0, targets=["q_proj", "v_proj"])
    m = tiny_llama(); m.requires_grad_(True); return m

def _small():
    torch.manual_seed(0); m = Small(); x, y = torch.randn(16, 6), torch.randn(16, 3)
    return m, lambda mm: (mm(x) - y).pow(2).mean()

CASES = [  # (name, model factory -> (model, loss of model), lr, eps, weight decay, steps)
    ("tiny-llama full FT", lambda: (lambda b: (_tiny("full"), lambda mm: compute_loss(mm, b)))(_batch()), 1e-3, 1e-3, 0.0, 3),
    ("tiny-llama LoRA", lambda: (lambda b: (_tiny("lora"), lambda mm: compute_loss(mm, b)))(_batch()), 1e-2, 1e-2, 0.0, 3),
    ("small net, weight decay", _small, 1e-3, 1e-3, 0.1, 5),
]

@pytest.mark.parametrize("name,make,lr,eps,wd,steps", CASES, ids=[c[0] for c in CASES])
def test_matches_reference(name, make, lr, eps, wd, steps):
    torch.manual_seed(0); ours, loss = make()
    torch.manual_seed(0); theirs, _ = make()
    ours.eval(); theirs.eval()
    opt = MeZO([p for p in ours.parameters() if p.requires_grad], lr=lr, eps=eps, weight_decay=wd)
    ref = Reference(theirs, lr, eps, wd)
    for k in range(steps):
        torch.manual_seed(100 + k)
        with torch.no_grad(): opt.step(lambda: loss(ours))
        loss1 = ref.zo_step(lambda: loss(theirs), opt.last["seed"]); ref.zo_update()
        assert abs(loss1.item() - opt.last["loss_plus"]) <= 1e-6 * max(1.0, abs(loss1.item()))
        # (L+ - L-) / 2ε magnifies the losses' last-bit differences (from ulp-level parameter differences) by 1/2ε
        conditioning = 8 * 2**-24 * abs(loss1.item()) / (2 * eps)
        assert abs(ref.projected_grad - opt.last["projected_grad"]) <= max(1e-6, conditioning), (k, ref.projected_grad, opt.last)
    for (n, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-5, msg=lambda m: f"{name}: {n}: {m}")  # ZO steps scale last-bit loss differences by 1/2ε


def test_perturbation_is_the_references_bit_for_bit():
    "The perturbed weights (what the forward passes see) equal the reference's exactly."
    ours, theirs = _tiny("full"), _tiny("full")
    opt, ref = MeZO(list(ours.parameters()), eps=1e-3), Reference(theirs, 0.0, 1e-3, 0.0)
    ref.named_parameters_to_optim = list(theirs.named_parameters())
    for scale in (1, -2, 1):
        opt.perturb(1234, float(scale)); ref.zo_perturb_parameters(1234, scale)
        for a, b in zip(ours.parameters(), theirs.parameters()): assert torch.equal(a, b)


def _fit(model, batch, steps, **kw):
    return fit(model, [batch], steps=steps, lr=kw.pop("lr", 1e-3), optimizer=kw.pop("optimizer", "mezo"),
               schedule="constant", warmup=0, progress=False, **kw)

@pytest.mark.parametrize("kind", ["full", "lora"])
def test_fit_equals_stepping_by_hand(kind):
    "fit(optimizer='mezo') takes the steps a hand loop over MeZO.step takes, seeds included."
    batch, steps = _batch(), 3
    torch.manual_seed(0); a = _tiny(kind); log = _fit(a, batch, steps, optimizer_options=dict(eps=1e-2))
    torch.manual_seed(0); b = _tiny(kind); b.train()
    params = [p for p in b.parameters() if p.requires_grad]
    opt = MeZO(params, lr=1e-3, eps=1e-2)
    seed_everything(0)
    for _ in range(steps):
        with torch.no_grad(): last = opt.step(lambda: compute_loss(b, batch))
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6, msg=lambda m: f"{n}: {m}")
    assert abs(log.losses[-1] - last.item()) < 1e-5
    if kind == "lora":  # the base stayed where it was
        assert torch.equal(a.model.layers[0].self_attn.q_proj.base_layer.weight, tiny_llama().model.layers[0].self_attn.q_proj.weight)


class StopAt(Callback):
    def __init__(self, step): self.at = step
    def on_step_end(self, state):
        if state.step == self.at: state.stop = True

@pytest.mark.parametrize("kind", ["full", "lora"])
def test_resume_equals_an_uninterrupted_run(kind, tmp_path):
    batch = _batch()
    torch.manual_seed(0); straight = _tiny(kind); _fit(straight, batch, 4, checkpoint_dir=tmp_path / "a", checkpoint_every=2)
    torch.manual_seed(0); _fit(_tiny(kind), batch, 4, checkpoint_dir=tmp_path / "b", checkpoint_every=2, callbacks=[StopAt(2)])
    torch.manual_seed(0); resumed = _tiny(kind); _fit(resumed, batch, 4, checkpoint_dir=tmp_path / "b", checkpoint_every=2, resume=True)
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters()): assert torch.equal(p, q), n


def test_fit_refuses_dropout_and_accumulation():
    batch = _batch()
    with pytest.raises(ValueError, match="dropout"):
        _fit(apply(tiny_llama(), "lora", r=4, dropout=0.1), batch, 1)
    with pytest.raises(ValueError, match="grad_accum=1"):
        _fit(_tiny("lora"), batch, 1, grad_accum=2)


@pytest.mark.parametrize("name", ["sparse-mezo", "zo-adam", "zo-sgd-conserve"])
def test_family_resumes_exactly(name, tmp_path):
    "The family under fit: a resumed run (ZO-Adam's moments through the checkpoint) equals the uninterrupted one."
    batch, kw = _batch(), dict(optimizer=name, checkpoint_every=2)
    torch.manual_seed(0); straight = _tiny("lora"); _fit(straight, batch, 4, checkpoint_dir=tmp_path / "a", **kw)
    torch.manual_seed(0); _fit(_tiny("lora"), batch, 4, checkpoint_dir=tmp_path / "b", callbacks=[StopAt(2)], **kw)
    torch.manual_seed(0); resumed = _tiny("lora"); _fit(resumed, batch, 4, checkpoint_dir=tmp_path / "b", resume=True, **kw)
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters()): assert torch.equal(p, q), n
