"""Bit-identity of peftlab's blockwise 8-bit quantisation (`peftlab.quant.blockwise8`) with bitsandbytes' on CPU.

Each row is one input: a dtype, a blocksize (powers of two and not), a shape (many not a multiple of the
blocksize), a code (signed or unsigned dynamic map, or a linear one) and a kind of data. Codes, absmax and
dequantised values must equal bitsandbytes' bit for bit. A second table checks every finite bfloat16 and
float16 value in [-1, 1] (absmax 1, so each value is its own normalised value), which covers every grid
point of bitsandbytes' lookup table that these dtypes can reach, ties and near-ties included.
"""
import itertools
import pytest
import torch
import bitsandbytes.functional as bnbF
from bitsandbytes.functional import QuantState
from peftlab.quant.blockwise8 import dynamic_map, quantize_blockwise, dequantize_blockwise

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BLOCKSIZES = [64, 128, 256, 4096, 100, 7]
SHAPES = [(1000,), (33, 70), (7, 13), (3, 5, 67), (4097,), (1,), (256,)]
CODES = {"signed": lambda: dynamic_map(signed=True), "unsigned": lambda: dynamic_map(signed=False),
         "linear": lambda: torch.linspace(-1, 1, 256)}
KINDS = ["normal", "decades", "zero-block", "ties", "outlier", "specials"]


def make_input(shape, dtype, kind, code_name, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    flat = x.view(-1)
    if kind == "decades":  # magnitudes over ten decades, as in optimiser states
        flat.mul_(torch.logspace(-8, 2, flat.numel())[torch.randperm(flat.numel(), generator=g)])
    if kind == "zero-block": flat[: min(300, flat.numel())] = 0
    if kind == "outlier": flat[flat.numel() // 2] = 1e4
    if kind == "ties":  # exactly between two code values (absmax 1), and one float step either side
        code = CODES[code_name]()
        mids = (code[:-1] + code[1:]) / 2
        near = torch.cat([mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0))])
        flat[:] = near.repeat(flat.numel() // near.numel() + 1)[: flat.numel()]
        flat[0] = 1.0
    if kind == "specials":
        sp = torch.tensor([0.0, -0.0, 1e-40, -1e-42, 3e38, -3e38, float("nan"), 1.0, -1.0])
        flat[: min(sp.numel(), flat.numel())] = sp[: flat.numel()]
    if code_name == "unsigned": x = x.abs()
    return x.to(dtype)


def bnb_dequantize(codes, absmax, code, blocksize, dtype):
    return bnbF.dequantize_blockwise(codes, QuantState(absmax=absmax, code=code, blocksize=blocksize, dtype=dtype))


def check_identical(x, blocksize, code):
    ours, ours_absmax = quantize_blockwise(x, blocksize, code=code)
    theirs, state = bnbF.quantize_blockwise(x, code=code.clone(), blocksize=blocksize)
    assert torch.equal(ours, theirs), f"{(ours != theirs).sum()} of {ours.numel()} codes differ"
    assert torch.equal(ours_absmax, state.absmax) or torch.equal(ours_absmax.isnan(), state.absmax.isnan())
    for dtype in DTYPES:
        ours_x = dequantize_blockwise(ours, ours_absmax, blocksize, code=code, dtype=dtype)
        theirs_x = bnb_dequantize(theirs, state.absmax, code, blocksize, dtype)
        assert torch.equal(ours_x.isnan(), theirs_x.isnan())
        assert torch.equal(ours_x.nan_to_num(0), theirs_x.nan_to_num(0)), f"dequantised {dtype} differs"


def rows():
    "Every dtype x blocksize x code x kind, each with the next shape in turn (so every shape meets every blocksize)."
    combos = [c for c in itertools.product(DTYPES, BLOCKSIZES, CODES, KINDS) if not (c[2] != "signed" and c[3] == "specials")]
    return [(d, b, SHAPES[i % len(SHAPES)], c, k) for i, (d, b, c, k) in enumerate(combos)]


@pytest.mark.parametrize("dtype,blocksize,shape,code_name,kind", rows())
def test_matches_bitsandbytes(dtype, blocksize, shape, code_name, kind):
    x = make_input(shape, dtype, kind, code_name)
    check_identical(x, blocksize, CODES[code_name]())


def all_values(dtype):
    "Every finite value of a 16-bit dtype in [-1, 1], in blocks of 255 led by 1.0 (absmax 1)."
    v = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    v = v[v.isfinite() & (v.abs() <= 1)].float()
    v = torch.cat([v, torch.zeros(-v.numel() % 255)]).view(-1, 255)
    return torch.cat([torch.ones(v.shape[0], 1), v], 1).reshape(-1).to(dtype)


@pytest.mark.parametrize("dtype,code_name", list(itertools.product([torch.bfloat16, torch.float16], CODES)))
def test_every_16bit_value(dtype, code_name):
    x = all_values(dtype)
    if code_name == "unsigned": x = x.abs()
    check_identical(x, 256, CODES[code_name]())


def test_dynamic_maps_match():
    for signed in (True, False):
        assert torch.equal(dynamic_map(signed), bnbF.create_dynamic_map(signed=signed))


@pytest.mark.parametrize("call,error,match", [
    (lambda: quantize_blockwise(torch.randn(10), blocksize=0), ValueError, "blocksize must be a positive integer"),
    (lambda: quantize_blockwise(torch.randn(10), blocksize=-256), ValueError, "blocksize must be a positive integer"),
    (lambda: quantize_blockwise(torch.randn(10), blocksize=64.0), ValueError, "blocksize must be a positive integer"),
    (lambda: quantize_blockwise(torch.arange(10)), TypeError, "float32, float16 or bfloat16"),
    (lambda: quantize_blockwise(torch.randn(10).double()), TypeError, "cast with x.float()"),
    (lambda: quantize_blockwise(torch.randn(10), code=torch.linspace(-1, 1, 16)), ValueError, "256 float values"),
    (lambda: dequantize_blockwise(torch.zeros(10, dtype=torch.uint8), torch.ones(2), blocksize=64), ValueError,
     "need 1 absmax values, got 2"),
    (lambda: dequantize_blockwise(torch.zeros(10, dtype=torch.int8), torch.ones(1)), TypeError, "codes must be uint8"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match): call()
