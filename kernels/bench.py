#!/usr/bin/env python
"""Benchmarks of peftlab's Triton kernels against PyTorch eager, torch.compile, bitsandbytes and liger-kernel.

    python kernels/bench.py                       # every family, shapes from SmolLM2-135M and Llama-3-8B, then end-to-end
    python kernels/bench.py --families rms_norm,swiglu --no-compile --no-e2e
    python kernels/bench.py --cpu-smoke           # no GPU needed: runs every reference on small shapes, times nothing

Each kernel family has one `setup_<family>(cfg, tokens, dtype, device)` that builds the inputs and the providers
(peftlab, eager, torch.compile, bitsandbytes, liger where importable); the speed and memory runs share it. Times are
`triton.testing.do_bench` medians with the 20th and 80th percentiles, after a warm-up. Memory-bound kernels report
GB/s next to the device's measured copy bandwidth, matmul-bound ones TFLOP/s next to its measured bfloat16 matmul
rate. The end-to-end section times LoRA and QLoRA training steps of a ~1B Llama at sequence length 2048, each
variant in its own process (liger patches transformers' classes globally). Results go to
kernels/results/<device>-<date>.json and .png. Without CUDA there is no speed to measure: the script runs the
references, says so, and writes a JSON marked "cpu-reference-only" with no timings in it.
"""
from __future__ import annotations
import argparse, datetime, gc, importlib, json, math, os, platform, re, subprocess, sys, time, traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch
import torch.nn.functional as F

RESULTS = ROOT / "kernels" / "results"

# ---------------------------------------------------------------------------------------------------------------
# Model configurations the shapes come from
# ---------------------------------------------------------------------------------------------------------------
CONFIGS = {  # hidden H, intermediate I, vocabulary V, query heads, key/value heads, head dim D
    "smollm2-135m": dict(H=576, I=1536, V=49152, heads=9, kv_heads=3, D=64),
    "llama-3-8b": dict(H=4096, I=14336, V=128256, heads=32, kv_heads=8, D=128),
    "tiny": dict(H=64, I=128, V=1000, heads=4, kv_heads=2, D=16),          # --cpu-smoke only
}
GPU_SHAPES = [("smollm2-135m", 8192), ("llama-3-8b", 8192), ("llama-3-8b", 32768)]   # (config, tokens): 4 x 2048, and 32k
SMOKE_SHAPES = [("tiny", 64)]
E2E_CONFIG = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,  # Llama-3.2-1B
                  num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, rms_norm_eps=1e-5,
                  tie_word_embeddings=True, rope_theta=500000.0)


def optional(module:str, attr:str|None=None):
    "`module` (or its `attr`) if it imports, else None: every provider but PyTorch's is optional."
    try:
        mod = importlib.import_module(module)
        return getattr(mod, attr) if attr else mod
    except Exception: return None


# ---------------------------------------------------------------------------------------------------------------
# One setup per kernel family
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    family: str
    shape: str                          # readable shape, e.g. "8192x4096"
    inputs: list                        # the providers' arguments; float tensors that require grad get gradients
    providers: dict[str, Callable]      # name -> fn(*inputs) returning a tensor or a tuple of tensors
    modes: tuple = ("forward", "backward", "full")
    work: dict = field(default_factory=dict)   # mode -> bytes moved (metric GB/s) or flops (metric TFLOP/s)
    metric: str = "GB/s"


def _compiled(fn):
    "torch.compile of `fn`, or None if compiling is switched off or unavailable."
    return None if os.environ.get("BENCH_NO_COMPILE") else torch.compile(fn, dynamic=False)


def _providers(peftlab, eager, liger=None, bnb=None, compile_ref=True)->dict:
    ps = {"peftlab": peftlab, "eager": eager, "torch.compile": _compiled(eager) if compile_ref else None,
          "liger": liger, "bitsandbytes": bnb}
    return {k: v for k, v in ps.items() if v is not None}


def setup_rms_norm(cfg, tokens, dtype, device)->Case:
    from peftlab.kernels.rms_norm_kernel import rms_norm, rms_norm_ref
    H = cfg["H"]
    x = torch.randn(tokens, H, device=device, dtype=dtype, requires_grad=True)
    w = torch.ones(H, device=device, dtype=dtype, requires_grad=True)
    liger = None
    LigerRMSNorm = optional("liger_kernel.transformers", "LigerRMSNorm")
    if LigerRMSNorm is not None and device == "cuda":
        m = LigerRMSNorm(H, eps=1e-5).to(device, dtype)
        liger = lambda x, w: m(x)
    e = x.element_size()
    n = tokens * H
    return Case("rms_norm", f"{tokens}x{H}", [x, w],
                _providers(lambda x, w: rms_norm(x, w, 1e-5), lambda x, w: rms_norm_ref(x, w, 1e-5), liger),
                work=dict(forward=2 * n * e, backward=3 * n * e, full=5 * n * e))


def setup_rope(cfg, tokens, dtype, device)->Case:
    from peftlab.kernels.rope_kernel import rope, rope_ref
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    B, T = (1, tokens) if tokens > 8192 else (max(1, tokens // 2048), min(tokens, 2048))   # 4 x 2048, or 1 x 32k
    Hq, Hk, D = cfg["heads"], cfg["kv_heads"], cfg["D"]
    qkv = torch.randn(B, T, (Hq + 2 * Hk) * D, device=device, dtype=dtype)    # attention's projections' output
    q = qkv[..., :Hq * D].view(B, T, Hq, D).transpose(1, 2).detach().requires_grad_()
    k = qkv[..., Hq * D:(Hq + Hk) * D].reshape(B, T, Hk, D).transpose(1, 2).detach().requires_grad_()
    rot = LlamaRotaryEmbedding(LlamaConfig(hidden_size=Hq * D, num_attention_heads=Hq, max_position_embeddings=T)).to(device)
    cos, sin = rot(q, torch.arange(T, device=device)[None])
    liger_rope = optional("liger_kernel.transformers.rope", "liger_rotary_pos_emb")
    liger = (lambda q, k: liger_rope(q, k, cos, sin)) if liger_rope is not None and device == "cuda" else None
    e = q.element_size()
    qk = (q.numel() + k.numel()) * e
    return Case("rope", f"B{B} T{T} H{Hq}/{Hk} D{D}", [q, k],
                _providers(lambda q, k: rope(q, k, cos, sin), lambda q, k: apply_rotary_pos_emb(q, k, cos, sin), liger),
                work=dict(forward=2 * qk, backward=2 * qk, full=4 * qk))


def setup_swiglu(cfg, tokens, dtype, device)->Case:
    from peftlab.kernels.swiglu_kernel import swiglu, swiglu_ref
    I = cfg["I"]
    g = torch.randn(tokens, I, device=device, dtype=dtype, requires_grad=True)
    u = torch.randn(tokens, I, device=device, dtype=dtype, requires_grad=True)
    LigerSiLUMul = optional("liger_kernel.ops.swiglu", "LigerSiLUMulFunction")
    liger = LigerSiLUMul.apply if LigerSiLUMul is not None and device == "cuda" else None
    n, e = tokens * I, g.element_size()
    return Case("swiglu", f"{tokens}x{I}", [g, u], _providers(swiglu, swiglu_ref, liger),
                work=dict(forward=3 * n * e, backward=5 * n * e, full=8 * n * e))


def setup_fused_linear_cross_entropy(cfg, tokens, dtype, device)->Case:
    from peftlab.kernels.fused_linear_cross_entropy_kernel import fused_linear_cross_entropy, fused_linear_cross_entropy_ref
    H, V = cfg["H"], cfg["V"]
    h = (torch.randn(tokens, H, device=device) / H ** 0.5).to(dtype).requires_grad_()
    W = (torch.randn(V, H, device=device) / H ** 0.5).to(dtype).requires_grad_()
    y = torch.randint(0, V, (tokens,), device=device)
    y[: tokens // 4] = -100                                               # prompt tokens
    Liger = optional("liger_kernel.transformers", "LigerFusedLinearCrossEntropyLoss")
    liger = None
    if Liger is not None and device == "cuda":
        loss_fn = Liger(ignore_index=-100)
        liger = lambda h, W: loss_fn(W, h, y)
    return Case("fused_linear_cross_entropy", f"{tokens}x{H} V{V}", [h, W],
                _providers(lambda h, W: fused_linear_cross_entropy(h, W, y), lambda h, W: fused_linear_cross_entropy_ref(h, W, y), liger),
                modes=("full",), work=dict(full=6 * tokens * H * V), metric="TFLOP/s")


def _nf4(W):
    "NF4 parts of `W` for peftlab (packed, absmax, extra kwargs) and, on CUDA, bitsandbytes' (codes, quant_state)."
    bnbF = optional("bitsandbytes.functional") if W.is_cuda else None
    if bnbF is not None:
        qw, st = bnbF.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
        extra = dict(absmax_code=st.state2.code, absmax_scale=st.state2.absmax, absmax_offset=st.offset)
        return qw, st.absmax, extra, (qw, st)
    from peftlab.quant.nf4 import quantize_nf4
    packed, absmax = quantize_nf4(W, 64)
    return packed, absmax, {}, None


def setup_nf4_dequantize(cfg, tokens, dtype, device)->Case:
    nf4 = optional("peftlab.kernels.nf4")
    if nf4 is None: raise ModuleNotFoundError("peftlab.kernels.nf4 is not there yet")
    N, K = cfg["I"], cfg["H"]
    packed, absmax, extra, theirs = _nf4(torch.randn(N, K, device=device))
    ours = lambda: nf4.nf4_dequantize(packed, absmax, (N, K), 64, dtype, **extra)
    ref = lambda: nf4.nf4_dequantize_ref(packed, absmax, (N, K), 64, dtype, **extra)
    bnbF = optional("bitsandbytes.functional")
    bnb = (lambda: bnbF.dequantize_4bit(*theirs).to(dtype)) if theirs is not None else None
    n = N * K
    return Case("nf4_dequantize", f"{N}x{K}", [], _providers(ours, ref, bnb=bnb), modes=("forward",),
                work=dict(forward=n * (0.5 + 1 / 64 + 2)))      # codes + 8-bit scale codes in, bfloat16 out


def setup_nf4_linear(cfg, tokens, dtype, device)->Case:
    nf4 = optional("peftlab.kernels.nf4")
    if nf4 is None: raise ModuleNotFoundError("peftlab.kernels.nf4 is not there yet")
    N, K = cfg["I"], cfg["H"]
    packed, absmax, extra, theirs = _nf4(torch.randn(N, K, device=device) / K ** 0.5)
    x = torch.randn(tokens, K, device=device, dtype=dtype, requires_grad=True)
    bnb_mod = optional("bitsandbytes")
    bnb = (lambda x: bnb_mod.matmul_4bit(x, theirs[0].t(), quant_state=theirs[1])) if theirs is not None else None
    mk = 2 * tokens * N * K
    return Case("nf4_linear", f"{tokens}x{K} -> {N}", [x],
                _providers(lambda x: nf4.nf4_linear(x, packed, absmax, (N, K), 64, **extra),
                           lambda x: nf4.nf4_linear_ref(x, packed, absmax, (N, K), 64, **extra), bnb=bnb),
                work=dict(forward=mk, backward=mk, full=2 * mk), metric="TFLOP/s")


def setup_lora_linear(cfg, tokens, dtype, device, r=16)->Case:
    ll = optional("peftlab.kernels.lora_linear_kernel")
    if ll is None: raise ModuleNotFoundError("peftlab.kernels.lora_linear_kernel is not there yet")
    N, K = cfg["I"], cfg["H"]
    W = (torch.randn(N, K, device=device) / K ** 0.5).to(dtype)
    x = torch.randn(tokens, K, device=device, dtype=dtype, requires_grad=True)
    A = (torch.randn(r, K, device=device) / K ** 0.5).to(dtype).requires_grad_()
    B = (torch.randn(N, r, device=device) / r ** 0.5).to(dtype).requires_grad_()
    M = tokens
    fwd = 2 * M * K * N + 2 * M * K * r + 2 * M * r * N
    bwd = 2 * M * N * K + 2 * M * N * r + 2 * M * r * K + 2 * M * r * K + 2 * M * N * r     # dx (2 matmuls), dA, dB
    return Case("lora_linear", f"{M}x{K} -> {N} r{r}", [x, A, B],
                _providers(lambda x, A, B: ll.lora_linear(x, W, A, B, 2.0), lambda x, A, B: ll.lora_linear_ref(x, W, A, B, 2.0)),
                work=dict(forward=fwd, backward=bwd, full=fwd + bwd), metric="TFLOP/s")


FAMILIES = {"rms_norm": setup_rms_norm, "rope": setup_rope, "swiglu": setup_swiglu,
            "fused_linear_cross_entropy": setup_fused_linear_cross_entropy, "nf4_dequantize": setup_nf4_dequantize,
            "nf4_linear": setup_nf4_linear, "lora_linear": setup_lora_linear}
SKIP_LONG = {"nf4_dequantize"}   # its shape does not depend on the number of tokens


# ---------------------------------------------------------------------------------------------------------------
# Running a case: forward, backward, both; time and peak memory
# ---------------------------------------------------------------------------------------------------------------
def _as_tuple(out): return tuple(out) if isinstance(out, (tuple, list)) else (out,)

def _grad_inputs(case): return [t for t in case.inputs if isinstance(t, torch.Tensor) and t.requires_grad]

def _step(case:Case, fn:Callable, mode:str)->Callable:
    "A no-argument function that runs `fn` in `mode`."
    if mode == "forward": return lambda: fn(*case.inputs)
    outs = [o for o in _as_tuple(fn(*case.inputs)) if o.requires_grad]
    dys = [torch.randn_like(o) for o in outs]
    if mode == "backward": return lambda: torch.autograd.backward(outs, dys, retain_graph=True)
    return lambda: torch.autograd.backward([o for o in _as_tuple(fn(*case.inputs)) if o.requires_grad], dys)

def _peak_memory_mb(run:Callable)->float:
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run(); torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20

def time_case(case:Case, peak:dict)->list[dict]:
    "Rows of results for every provider and mode of `case`, timed on the GPU."
    import triton.testing
    rows = []
    for name, fn in case.providers.items():
        for mode in case.modes:
            row = dict(family=case.family, shape=case.shape, provider=name, mode=mode, metric=case.metric)
            try:
                run = _step(case, fn, mode)
                for _ in range(3): run()                                   # warm-up: compile, autotune, caches
                ms = triton.testing.do_bench(run, quantiles=[0.5, 0.2, 0.8], grad_to_none=_grad_inputs(case))
                value = case.work[mode] / (ms[0] * 1e-3) / (1e9 if case.metric == "GB/s" else 1e12)
                ref = peak["copy_GB/s"] if case.metric == "GB/s" else peak["bf16_matmul_TFLOP/s"]
                row.update(ms=ms, value=value, fraction_of_peak=value / ref, peak_memory_mb=_peak_memory_mb(run))
            except Exception as e:
                row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            rows.append(row)
            print(_format_row(row), flush=True)
    return rows

def _format_row(r:dict)->str:
    head = f"{r['family']:27s} {r['shape']:26s} {r['provider']:13s} {r['mode']:8s}"
    if "error" in r: return f"{head} skipped: {r['error']}"
    p50, p20, p80 = r["ms"]
    return (f"{head} {p50:8.3f} ms [{p20:.3f}, {p80:.3f}]  {r['value']:8.1f} {r['metric']:7s} "
            f"({100 * r['fraction_of_peak']:5.1f}% of peak)  peak mem {r['peak_memory_mb']:8.1f} MiB")


def measure_peak(device="cuda")->dict:
    "The device's measured copy bandwidth (1 GiB copy) and bfloat16 matmul rate (8192³)."
    import triton.testing
    x = torch.empty(2**29, dtype=torch.bfloat16, device=device); y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), quantiles=[0.5, 0.2, 0.8])[0]
    copy = 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9
    del x, y
    a, b = (torch.randn(8192, 8192, dtype=torch.bfloat16, device=device) for _ in range(2))
    ms = triton.testing.do_bench(lambda: a @ b, quantiles=[0.5, 0.2, 0.8])[0]
    return {"copy_GB/s": copy, "bf16_matmul_TFLOP/s": 2 * 8192**3 / (ms * 1e-3) / 1e12}


# ---------------------------------------------------------------------------------------------------------------
# End to end: a LoRA / QLoRA training step on a ~1B Llama, one process per variant
# ---------------------------------------------------------------------------------------------------------------
E2E_VARIANTS = ["peft-lora", "peftlab-lora", "peftlab-lora-patched", "liger-peft-lora",
                "peft-bnb-qlora", "peftlab-qlora", "peftlab-qlora-patched", "liger-peft-bnb-qlora"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

def _e2e_model(variant:str, r:int=16):
    "The ~1B Llama of `variant`, on CUDA in bfloat16, with its adapters (and patches) applied."
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(**E2E_CONFIG)
    if "liger" in variant: optional("liger_kernel.transformers", "apply_liger_kernel_to_llama")()
    if "bnb" in variant: model = _bnb_4bit_model(config)
    else:
        with torch.device("cuda"): model = LlamaForCausalLM(config).to(torch.bfloat16)
    if "peft" in variant and "peftlab" not in variant:
        import peft
        if "bnb" in variant: model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
    from peftlab.core.registry import apply
    if "qlora" in variant:   # as bitsandbytes' QLoRA below: NF4, double quantisation, bfloat16 compute
        model = apply(model, "qlora", r=r, alpha=2 * r, targets=TARGETS, double_quant=True, compute_dtype="bfloat16")
    else: model = apply(model, "lora", r=r, alpha=2 * r, targets=TARGETS)
    if "patched" in variant:
        from peftlab.kernels.patching import patch
        patch(model)
    return model

def _bnb_4bit_model(config):
    "A random Llama loaded through transformers' bitsandbytes 4-bit path (NF4, double quantisation, bf16 compute)."
    import tempfile
    from transformers import LlamaForCausalLM, BitsAndBytesConfig
    with tempfile.TemporaryDirectory() as d:
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(d)
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
        return LlamaForCausalLM.from_pretrained(d, quantization_config=q, dtype=torch.bfloat16, device_map={"": 0})

def run_e2e_variant(variant:str, seq:int=2048, batch:int=1, steps:int=5, warmup:int=2)->dict:
    "tokens/s and peak memory of `steps` LoRA training steps (forward with labels, backward, AdamW)."
    torch.manual_seed(0)
    model = _e2e_model(variant).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, E2E_CONFIG["vocab_size"], (batch, seq), device="cuda")
    def step():
        model(input_ids=ids, labels=ids).loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    for _ in range(warmup): step()
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps): step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    return dict(variant=variant, seq=seq, batch=batch, steps=steps, tokens_per_s=batch * seq * steps / dt,
                peak_memory_gb=torch.cuda.max_memory_allocated() / 2**30)

def run_e2e(variants=E2E_VARIANTS)->list[dict]:
    "Every end-to-end variant in a fresh process; a variant whose libraries are missing reports why."
    rows = []
    for v in variants:
        r = subprocess.run([sys.executable, __file__, "--e2e-variant", v], capture_output=True, text=True, timeout=1800)
        out = [l for l in r.stdout.splitlines() if l.startswith("E2E ")]
        row = json.loads(out[-1][4:]) if out else dict(variant=v, error=(r.stderr.strip().splitlines() or ["?"])[-1][:300])
        rows.append(row)
        print("e2e", row if "error" in row else
              f"{v:24s} {row['tokens_per_s']:9.0f} tokens/s  peak {row['peak_memory_gb']:6.2f} GiB", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# CPU smoke: every reference on small shapes, no timings
# ---------------------------------------------------------------------------------------------------------------
def cpu_smoke(families)->list[dict]:
    "Set up every family on CPU at tiny shapes, run each provider forward and backward, compare it with eager."
    os.environ["BENCH_NO_COMPILE"] = "1"
    rows = []
    for fam in families:
        for cfg_name, tokens in SMOKE_SHAPES:
            row = dict(family=fam, config=cfg_name, tokens=tokens)
            try:
                case = FAMILIES[fam](CONFIGS[cfg_name], tokens, torch.float32, "cpu")
                eager = _as_tuple(case.providers["eager"](*case.inputs))
                for name, fn in case.providers.items():
                    for mode in case.modes: _step(case, fn, mode)()
                    if name == "eager": continue
                    out = _as_tuple(fn(*case.inputs))
                    row[f"max_abs_diff_{name}_vs_eager"] = max((a.detach().float() - b.detach().float()).abs().max().item()
                                                               for a, b in zip(out, eager))
                row.update(shape=case.shape, providers=sorted(case.providers), modes=list(case.modes), ran=True)
            except Exception as e:
                row.update(ran=False, error=f"{type(e).__name__}: {e}"[:300])
            rows.append(row)
            print(f"{fam:27s} {row.get('shape', ''):22s} " + ("ran: " + ", ".join(row["providers"]) if row["ran"] else row["error"]))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Results: JSON and a plot
# ---------------------------------------------------------------------------------------------------------------
def versions()->dict:
    mods = ["torch", "triton", "transformers", "peft", "bitsandbytes", "liger_kernel", "peftlab"]
    return {m: getattr(optional(m), "__version__", None) for m in mods} | {"python": platform.python_version()}

def device_name()->str: return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"

def slug(s:str)->str: return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")

def write_results(result:dict, out_dir:Path, stem:str)->Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {path}")
    return path

def plot(rows:list[dict], path:Path):
    "One panel per family: fraction of the device's peak reached by each provider, per shape (full step, else forward)."
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fams = sorted({r["family"] for r in rows if "value" in r})
    if not fams: return
    fig, axes = plt.subplots(len(fams), 1, figsize=(9, 2.4 * len(fams)), squeeze=False)
    for ax, fam in zip(axes[:, 0], fams):
        rs = [r for r in rows if r["family"] == fam and "value" in r]
        mode = "full" if any(r["mode"] == "full" for r in rs) else "forward"
        rs = [r for r in rs if r["mode"] == mode]
        shapes, provs = sorted({r["shape"] for r in rs}), sorted({r["provider"] for r in rs})
        width = 0.8 / len(provs)
        for i, p in enumerate(provs):
            vals = [next((100 * r["fraction_of_peak"] for r in rs if r["shape"] == s and r["provider"] == p), 0) for s in shapes]
            ax.bar([j + i * width for j in range(len(shapes))], vals, width, label=p)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, fontsize=7)
        ax.set_ylabel("% of peak"); ax.set_title(f"{fam} ({mode})", fontsize=9); ax.legend(fontsize=7)
    fig.tight_layout(); fig.savefig(path, dpi=120)
    print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated, from: " + ", ".join(FAMILIES))
    ap.add_argument("--cpu-smoke", action="store_true", help="run the references on tiny CPU shapes; time nothing")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile providers")
    ap.add_argument("--no-e2e", action="store_true", help="leave out the end-to-end training steps")
    ap.add_argument("--quick", action="store_true", help="only the first model configuration")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where the JSON and the plot go")
    ap.add_argument("--e2e-variant", help=argparse.SUPPRESS)     # internal: one end-to-end variant in this process
    args = ap.parse_args(argv)
    if args.e2e_variant:
        print("E2E " + json.dumps(run_e2e_variant(args.e2e_variant))); return
    families = [f for f in args.families.split(",") if f]
    unknown = set(families) - set(FAMILIES)
    if unknown: ap.error(f"unknown families {sorted(unknown)}; choose from {list(FAMILIES)}")
    date = datetime.date.today().isoformat()
    meta = dict(timestamp=datetime.datetime.now().isoformat(timespec="seconds"), versions=versions())
    if args.cpu_smoke or not torch.cuda.is_available():
        print("No CUDA device: speed needs a GPU. Running the references on small CPU shapes; no timings are taken.")
        rows = cpu_smoke(families)
        write_results(dict(mode="cpu-reference-only", device="cpu", **meta, rows=rows), args.out, f"cpu-reference-only-{date}")
        if not all(r["ran"] for r in rows if r["family"] not in ("nf4_dequantize", "nf4_linear", "lora_linear")):
            sys.exit("a reference failed to run")
        return
    if args.no_compile: os.environ["BENCH_NO_COMPILE"] = "1"
    peak = measure_peak()
    print(f"{device_name()}: copy {peak['copy_GB/s']:.0f} GB/s, bf16 matmul {peak['bf16_matmul_TFLOP/s']:.0f} TFLOP/s (measured)")
    rows = []
    for cfg_name, tokens in GPU_SHAPES[:1] if args.quick else GPU_SHAPES:
        for fam in families:
            if fam in SKIP_LONG and tokens > 8192: continue
            try: case = FAMILIES[fam](CONFIGS[cfg_name], tokens, torch.bfloat16, "cuda")
            except Exception as e:
                rows.append(dict(family=fam, config=cfg_name, tokens=tokens, error=f"setup: {type(e).__name__}: {e}"[:300]))
                print(f"{fam:27s} {cfg_name} {tokens}: skipped ({rows[-1]['error']})"); continue
            rows += [dict(r, config=cfg_name, tokens=tokens) for r in time_case(case, peak)]
            del case; gc.collect(); torch.cuda.empty_cache()
    e2e = [] if args.no_e2e else run_e2e()
    stem = f"{slug(device_name())}-{date}"
    stamp = dict(device=device_name(), timestamp=meta["timestamp"], peftlab=meta["versions"]["peftlab"])
    rows, e2e = [dict(r, **stamp) for r in rows], [dict(r, **stamp) for r in e2e]   # every row says where and when
    write_results(dict(mode="gpu", device=device_name(), peak=peak, **meta, rows=rows, e2e=e2e), args.out, stem)
    plot(rows, args.out / f"{stem}.png")


if __name__ == "__main__":
    main()
