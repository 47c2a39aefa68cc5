"""LoRA-Pro (`peftlab.optim.lora_pro`): the adjusted gradients against a least-squares oracle over shapes, and the
optimiser under `fit` (by name, resumed from a checkpoint, with other trainable parameters), and its errors.

The oracle is independent of the closed form: the best equivalent gradient s(B g_A + g_B A) in Frobenius distance
to g is a linear least-squares problem in (g_A, g_B); its vectorised (Kronecker) system is solved by `pinv`.
"""
import pytest
import torch
from peftlab.core.models import tiny_llama
from peftlab.core.registry import apply
from peftlab.core.train import fit, make_optimizer, Callback
from peftlab.optim.lora_pro import adjusted_grads, equivalent_gradient, solve_sylvester, LoraProAdamW

def kron_optimum(A, B, G, s):
    (m, r), n = B.shape, A.shape[1]
    I_m, I_n = torch.eye(m, dtype=G.dtype), torch.eye(n, dtype=G.dtype)
    K_A = torch.einsum("ik,jl->ijkl", B, I_n).reshape(m * n, r * n)    # vec(B g_A) = K_A vec(g_A)
    K_B = torch.einsum("il,kj->ijlk", I_m, A).reshape(m * n, m * r)    # vec(g_B A) = K_B vec(g_B)
    K = s * torch.cat([K_A, K_B], 1)
    return (K @ (torch.linalg.pinv(K) @ G.reshape(-1))).reshape(m, n)

SHAPES = [  # (out m, in n, rank r, scaling s)
    (7, 5, 1, 2.0), (12, 9, 3, 0.5), (16, 16, 4, 16 / 4 ** 0.5), (5, 11, 5, 1.0), (20, 6, 6, 3.0)]

@pytest.mark.parametrize("m,n,r,s", SHAPES)
def test_adjusted_grads_are_the_least_squares_optimum(m, n, r, s):
    g = torch.Generator().manual_seed(m * 100 + n)
    A, B, G = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((r, n), (m, r), (m, n)))
    dA, dB = s * B.T @ G, s * G @ A.T                     # LoRA's gradients, from the chain rule
    best = kron_optimum(A, B, G, s)
    exact = adjusted_grads(A, B, dA, dB, s, delta=0.0)
    torch.testing.assert_close(equivalent_gradient(A, B, exact.grad_A, exact.grad_B, s), best, rtol=0, atol=1e-9)
    pro = adjusted_grads(A, B, dA, dB, s)      # the reference's jitter δ = 1e-8 moves it by about δ·cond(AAᵀ)
    eq = equivalent_gradient(A, B, pro.grad_A, pro.grad_B, s)
    torch.testing.assert_close(eq, best, rtol=0, atol=1e-8 * torch.linalg.cond(A @ A.T).item() * G.abs().max().item())
    assert (eq - G).norm() <= (equivalent_gradient(A, B, dA, dB, s) - G).norm() + 1e-12
    BtB = B.T @ B
    # rtol 1e-5: the code inverts BᵀB + δI (δ = 1e-8, the reference's jitter), the equation has (BᵀB)⁻¹
    torch.testing.assert_close(BtB @ pro.X + pro.X @ A @ A.T, -(torch.linalg.inv(BtB) @ dA) @ A.T / s**2, rtol=1e-5, atol=1e-8)

@pytest.mark.parametrize("r", [1, 3, 8])
def test_sylvester_against_kronecker_solve(r):
    g = torch.Generator().manual_seed(r)
    M1, M2, C = (torch.randn(r, k, generator=g, dtype=torch.float64) for k in (r + 2, r + 5, r))
    P, Q = M1 @ M1.T, M2 @ M2.T
    I = torch.eye(r, dtype=torch.float64)
    expected = torch.linalg.solve(torch.kron(P, I) + torch.kron(I, Q.T.contiguous()), C.reshape(-1)).reshape(r, r)
    torch.testing.assert_close(solve_sylvester(P, Q, C), expected, rtol=1e-8, atol=1e-10)

def batches(n=3):
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 49152, (2, 12), generator=g) for _ in range(n)]
    return [dict(input_ids=x, attention_mask=torch.ones_like(x), labels=x) for x in ids]

def lora_model():
    torch.manual_seed(0)
    m = apply(tiny_llama(), "lora", r=4, targets=["q_proj", "v_proj", "down_proj"])
    m.model.norm.weight.requires_grad_(True)      # one non-LoRA trainable parameter: the AdamW group
    return m

def test_fit_by_name_lowers_the_loss():
    m = lora_model()
    log = fit(m, batches(), steps=12, lr=1e-2, optimizer="lora-pro", optimizer_options=dict(eps=1e-8), progress=False)
    assert log.losses[-1] < log.losses[0] - 0.05

class Killed(Exception): pass

class Kill(Callback):
    "A crash once `n` steps (and their checkpoint) are done."
    def __init__(self, n): self.n = n
    def on_step_begin(self, state):
        if state.step == self.n: raise Killed

def test_resume_is_bit_identical(tmp_path):
    kw = dict(steps=6, lr=1e-2, optimizer="lora-pro", progress=False, checkpoint_every=3)
    straight = lora_model(); log = fit(straight, batches(), checkpoint_dir=tmp_path / "a", **kw)
    with pytest.raises(Killed): fit(lora_model(), batches(), checkpoint_dir=tmp_path / "b", callbacks=[Kill(3)], **kw)
    resumed = lora_model(); log2 = fit(resumed, batches(), checkpoint_dir=tmp_path / "b", resume=True, **kw)
    assert log2.losses[-3:] == log.losses[-3:]
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters()): assert torch.equal(p, q), n

BAD = [  # (build the model, options, error type, words in the message)
    (lambda: tiny_llama().requires_grad_(True), {}, ValueError, "apply LoRA first"),
    (lambda: apply(tiny_llama(), "dora", r=4), {}, TypeError, "is a DoraLinear"),
    (lambda: apply(tiny_llama(), "lora", r=4), {"rank": 4}, TypeError, "rank"),
    (lambda: apply(tiny_llama(), "lora", r=4), {"delta": -1.0}, ValueError, "delta"),
]

@pytest.mark.parametrize("build,options,error,words", BAD)
def test_bad_use(build, options, error, words):
    with pytest.raises(error, match=words): make_optimizer(build(), "lora-pro", lr=1e-3, **options)
