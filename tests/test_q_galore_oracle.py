"""peftlab's Q-GaLore (`peftlab.optim.q_galore`) against `q-galore-torch` 1.0 on the CPU.

`QGaLoreAdamW8bit.update_step` calls bitsandbytes with the argument lists of an older release; with bitsandbytes
0.50 it fails on any device (a `percentile_clipping` key and two positional arguments are gone). `Reference` below
changes only that call, to the one bitsandbytes 0.50's own `Optimizer2State.update_step` makes, and makes
`torch.cuda.synchronize` a no-op; everything else (projector, INT4 projection, lazy rule, INT8 weights with
`float_grad`, stochastic rounding, weight decay) is the package's code. On the CPU, bitsandbytes' 8-bit Adam runs
in PyTorch, and `peftlab.quant.adamw8bit` equals it bit for bit.

Each row: a set of weights (float and INT8, tall and wide, projected and not), 20 steps of the same random
gradients (a drifting base, so the lazy rule acts), the same global random state before each step (stochastic
rounding draws from it, in group order in both). Every weight must agree to 1e-5 after every step, and so must
each projector's gap, FIFO and SVD count.
"""
import copy
import pytest
import torch
from torch import nn
import bitsandbytes.functional as bnbF
from q_galore_torch import QGaLoreAdamW8bit
from peftlab.core.models import tiny_llama, load_tokenizer
from peftlab.core.data import get_task, sft_loader
from peftlab.core.train import make_optimizer
from peftlab.optim.q_galore import Int8Linear, QGaLoreAdamW, QGaLoreConfig, make_q_galore, quantize_minmax


class Reference(QGaLoreAdamW8bit):
    "q-galore-torch's optimiser with its bitsandbytes call in bitsandbytes 0.50's form (the only change)."
    def get_config(self, gindex, pindex, group):
        return {**super().get_config(gindex, pindex, group), "percentile_clipping": 100, "block_wise": True}

    @torch.no_grad()
    def update_step(self, group, p, gindex, pindex, flag_use_float_grad=False):
        state, grad = self.state[p], (p.float_grad if flag_use_float_grad else p.grad)
        config = self.get_config(gindex, pindex, group)
        state["step"] += 1
        (b1, b2), eps, lr, wd = config["betas"], config["eps"], config["lr"], config["weight_decay"]
        if state["state1"].dtype == torch.float:
            bnbF.optimizer_update_32bit("adam", grad, p, state["state1"], b1, eps, state["step"], lr, state["state2"], b2,
                                        0.0, 0.0, wd, 1.0, None, max_unorm=0.0, skip_zeros=config["skip_zeros"])
        else:
            bnbF.optimizer_update_8bit_blockwise("adam", grad, p, state["state1"], state["state2"], b1, b2, 0.0, 0.0, eps,
                                                 state["step"], lr, state["qmap1"], state["qmap2"], state["absmax1"],
                                                 state["absmax2"], wd, gnorm_scale=1.0, skip_zeros=config["skip_zeros"])


@pytest.fixture(autouse=True)
def no_cuda_sync(monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)


SHAPES = {"tall": (256, 64), "wide": (64, 512), "square": (128, 128)}
ROWS = [  # projected weights (name, int8?), rank, gap, proj bits, queue, threshold, weight decay, lr
    ([("tall", False), ("wide", True)], 8, 2, 4, 3, 0.4, 0.0, 1e-3),
    ([("square", True), ("wide", True)], 16, 3, 4, 2, 0.2, 0.01, 5e-3),
    ([("tall", True)], 4, 1, 8, 4, 0.6, 0.1, 1e-2),
    ([("tall", False), ("square", False)], 32, 2, 4, 1, -1.0, 0.0, 1e-3),  # threshold -1: every check grows the gap
]


def make_weights(spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPES[name], generator=g) * 0.05 for name, _ in spec]


def q_keys(rank, gap, bits, queue, threshold):
    return dict(rank=rank, update_proj_gap=gap, scale=0.25, quant_group_size=256, cos_threshold=threshold,
                gamma_proj=2, queue_size=queue)


def reference(weights, spec, extra, keys, bits, wd, lr):
    params = []
    for w, (_, int8) in zip(weights, spec):
        if int8:
            codes, scales, zeros = QGaLoreAdamW8bit._quantize(None, w.clone(), q_group_size=256)
            p = nn.Parameter(codes, requires_grad=False)
            p.group_size, p.scales, p.zeros, p.stochastic_round, p.float_grad = 256, scales, zeros, True, None
        else: p = nn.Parameter(w.clone())
        params.append(p)
    plain = [nn.Parameter(e.clone()) for e in extra]
    opt = Reference([{"params": plain}, {"params": params, **keys, "proj_type": "std", "quant": True, "quant_n_bit": bits}],
                    lr=lr, weight_decay=wd)
    return params, plain, opt


def ours(weights, spec, extra, keys, bits, wd, lr):
    params, layers = [], []
    for w, (_, int8) in zip(weights, spec):
        if int8:
            base = nn.Linear(w.shape[1], w.shape[0], bias=False)
            with torch.no_grad(): base.weight.copy_(w)
            layers.append(Int8Linear(base, 256)); params.append(layers[-1].weight)
        else: params.append(nn.Parameter(w.clone()))
    plain = [nn.Parameter(e.clone()) for e in extra]
    opt = QGaLoreAdamW([{"params": plain}, {"params": params, **keys, "proj_bits": bits}], lr=lr, weight_decay=wd,
                       int8_layers=layers, per_layer=False)
    return params, plain, opt, {id(l.weight): l for l in layers}


def value(p, layers):
    return layers[id(p)].dequantized_weight() if id(p) in layers else p.detach()


def ref_value(p):
    return QGaLoreAdamW8bit._dequantize(None, p.data, torch.float32, 256, p.scales, p.zeros) if p.dtype == torch.uint8 else p.detach()


@pytest.mark.parametrize("spec,rank,gap,bits,queue,threshold,wd,lr", ROWS, ids=[f"row{i}" for i in range(len(ROWS))])
def test_equal_to_q_galore_torch(spec, rank, gap, bits, queue, threshold, wd, lr):
    weights, keys = make_weights(spec), q_keys(rank, gap, bits, queue, threshold)
    extra = [torch.randn(5000) * 0.1, torch.randn(64)]          # 8-bit and 32-bit AdamW states
    rp, rplain, ropt = reference(weights, spec, extra, keys, bits, wd, lr)
    op, oplain, oopt, layers = ours(weights, spec, extra, keys, bits, wd, lr)
    g = torch.Generator().manual_seed(1)
    bases = [torch.randn(w.shape, generator=g) for w in weights + extra]
    for t in range(20):
        grads = [b + 0.3 * torch.randn(b.shape, generator=g) for b in bases]
        for p, gr in zip(rp, grads):
            if p.dtype == torch.uint8: p.float_grad = gr.clone()
            else: p.grad = gr.clone()
        for p, gr in zip(rplain, grads[len(rp):]): p.grad = gr.clone()
        for p, gr in zip(op, grads):
            if id(p) in layers: layers[id(p)].weight_grad = gr.clone()
            else: p.grad = gr.clone()
        for p, gr in zip(oplain, grads[len(op):]): p.grad = gr.clone()
        torch.manual_seed(100 + t); ropt.step()
        torch.manual_seed(100 + t); oopt.step(); oopt.zero_grad()
        for i, (a, b) in enumerate(zip(op + oplain, rp + rplain)):
            torch.testing.assert_close(value(a, layers), ref_value(b), rtol=1e-5, atol=1e-5, msg=lambda m: f"step {t + 1}, parameter {i}: {m}")
        for a, b in zip(op, rp):
            proj, st = ropt.state[b]["projector"], oopt.state[a]
            assert (st["gap"], st["cos_queue"], st["svd_count"]) == (proj.update_proj_gap, proj.queue, proj.svd_count)
    assert sum(oopt.state[p]["svd_count"] for p in op) < len(op) * (-(-20 // gap))  # the lazy rule saved SVDs


@pytest.fixture(scope="module")
def batches():
    tok = load_tokenizer("tiny-llama")
    return list(sft_loader(get_task("record_format", n_train=8, n_test=2, seed=0).train, tok, batch_size=2, shuffle=False))


def run(batches, steps=3, **options):
    m = tiny_llama()
    opt = make_q_galore(m, QGaLoreConfig(rank=8, update_proj_gap=2, stochastic_round=False, **options), lr=1e-2)
    for t in range(steps):
        m(**batches[t % len(batches)]).loss.backward(); opt.step(); opt.zero_grad()
    return m, opt


def test_per_layer_equals_step_after_backward(batches):
    a, _ = run(batches, per_layer=True)
    b, _ = run(batches, per_layer=False)
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)


def test_state_dict_round_trip(batches):
    m, opt = run(batches, steps=2, per_layer=False)
    saved = copy.deepcopy((m.state_dict(), opt.state_dict()))   # state_dict() returns the live tensors
    m(**batches[2]).loss.backward(); opt.step(); opt.zero_grad()
    m2 = tiny_llama()
    opt2 = make_q_galore(m2, QGaLoreConfig(rank=8, update_proj_gap=2, stochastic_round=False, per_layer=False), lr=1e-2)
    m2.load_state_dict(saved[0]); opt2.load_state_dict(saved[1])
    m2(**batches[2]).loss.backward(); opt2.step(); opt2.zero_grad()
    for (n, p), q in zip(m.state_dict().items(), m2.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("options,message", [
    (dict(rank=33, targets=["k_proj"]), "choose rank <= 32"),
    (dict(proj_bits=1), "proj_bits=1 must be 2 to 8"),
    (dict(gamma_proj=0.5), "gamma_proj"),
    (dict(state_bits=16), "state_bits"),
    (dict(queue_size=0), "queue_size"),
    (dict(targets=["nope"]), "no module matched"),
])
def test_wrong_use(options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make_optimizer(tiny_llama(), "q-galore", lr=1e-3, **options)


def test_fit_refuses_clipping_and_accumulation(batches):
    from peftlab.core.train import fit
    for kw, message in ((dict(max_grad_norm=1.0), "max_grad_norm=None"), (dict(max_grad_norm=None, grad_accum=2), "grad_accum=1")):
        with pytest.raises(ValueError, match=message):
            fit(tiny_llama(), batches, steps=1, optimizer="q-galore", optimizer_options=dict(rank=4), progress=False, **kw)
