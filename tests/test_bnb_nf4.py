"""Bit-identity of peftlab's 4-bit quantisation (`peftlab.quant.nf4`) with bitsandbytes' on CPU.

Each row is one input: a dtype, a blocksize, a shape (many not a multiple of the blocksize, odd sizes
included) and a kind of data. Packed bytes, absmax and dequantised values must equal bitsandbytes'
bit for bit, for NF4 and FP4.

Dequantised values are compared with bitsandbytes' pure-PyTorch reference (`backends/default/ops.py`, its
FP4 table with code 8 = +0.0) always, and with the public `dequantize_4bit` on the path it takes on this CPU
(`bnb_cpu_dequantize_path`): its scalar C++ branch writes FP4's code 8 as -0.0, so the FP4 comparison there
uses `dequantize_fp4(..., negative_zero=True)`. On AVX-512 CPUs its vectorised branch mis-indexes blocks that
straddle two rows (row length not a multiple of the blocksize): those results are checked against the
reference only (`bnb_cpu_dequantize_sound`). The C++ kernel returns 1-D shapes as (1, n), so values are
compared flattened. Nothing here passes on one CPU and fails on another: the expected path is named.
"""
import itertools
import pytest
import torch
import bitsandbytes.functional as bnbF
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from peftlab.quant.nf4 import (NF4_CODE, FP4_CODE, quantize_nf4, dequantize_nf4, quantize_fp4, dequantize_fp4,
                               normal_float_levels, bnb_cpu_dequantize_path, bnb_cpu_dequantize_sound)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BLOCKSIZES = [64, 128, 256, 512, 1024, 2048, 4096]
SHAPES = [(64, 64), (128, 96), (33, 70), (7, 13), (3, 5, 67), (2, 2048), (4097,), (1,), (6, 40)]  # 70, 40: scalar branch
KINDS = ["zero-block", "ties", "outlier"]  # besides "normal"
FORMATS = {"nf4": (quantize_nf4, dequantize_nf4, NF4_CODE), "fp4": (quantize_fp4, dequantize_fp4, FP4_CODE)}


@pytest.fixture(autouse=True)
def no_compile():
    "bitsandbytes wraps its fallback in torch.compile (~20 s per shape); run it eagerly."
    with torch._dynamo.config.patch(disable=True): yield


def make_input(shape, dtype, kind, quant_type, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    flat = w.view(-1)
    if kind == "zero-block": flat[: min(300, flat.numel())] = 0     # whole blocks of zeros (and the partial one if small)
    if kind == "outlier": flat[flat.numel() // 2] = 5.0               # one large value sets its block's scale
    if kind == "ties":  # values exactly between two levels: absmax 1, then midpoints
        levels = FORMATS[quant_type][2].sort().values
        mids = (levels[:-1] + levels[1:]) / 2
        flat[0] = 1.0
        flat[1:] = mids.repeat(flat.numel() // mids.numel() + 1)[: flat.numel() - 1]
    return w.to(dtype)


def bits(t):
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


CASES = (list(itertools.product(DTYPES, BLOCKSIZES, SHAPES, ["normal"], FORMATS))
         + list(itertools.product(DTYPES, [64, 2048], [(128, 96), (7, 13), (4097,)], KINDS, FORMATS)))


@pytest.mark.parametrize("dtype,blocksize,shape,kind,quant_type", CASES,
                         ids=[f"{str(d)[6:]}-{b}-{'x'.join(map(str, s))}-{k}-{q}" for d, b, s, k, q in CASES])
def test_bit_identical(dtype, blocksize, shape, kind, quant_type):
    quantize, dequantize, code = FORMATS[quant_type]
    w = make_input(shape, dtype, kind, quant_type)
    theirs, state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
    packed, absmax = quantize(w, blocksize)
    assert packed.shape == theirs.shape and packed.dtype == torch.uint8
    assert torch.equal(packed, theirs), "packed codes differ"
    assert torch.equal(absmax, state.absmax), "absmax differs"
    ours = dequantize(packed, absmax, shape, blocksize, dtype)
    reference = _dequantize_4bit_compute(theirs.reshape(-1), state.absmax, code, blocksize, shape, dtype)
    assert ours.shape == reference.shape and ours.dtype == dtype
    assert torch.equal(bits(ours), bits(reference)), "dequantised values differ from bitsandbytes' reference"
    if bnb_cpu_dequantize_sound(shape, blocksize):  # see the module docstring
        signed = dict(negative_zero=bnb_cpu_dequantize_path(shape, blocksize) == "scalar") if quant_type == "fp4" else {}
        ours = dequantize(packed, absmax, shape, blocksize, dtype, **signed)
        public = bnbF.dequantize_4bit(theirs, state)  # its C++ kernel returns 1-D shapes as (1, n): compare values
        assert torch.equal(bits(ours).reshape(-1), bits(public).reshape(-1)), "differs from dequantize_4bit"


def test_fp4_zeros_by_path():
    "FP4's code 8 is +0.0 in bitsandbytes' table and -0.0 from its scalar kernel; the two are equal as numbers."
    packed = torch.full((64, 1), 0x88, dtype=torch.uint8)  # 128 values, all code 8
    assert not torch.signbit(dequantize_fp4(packed, torch.ones(2), (128,), dtype=torch.float32)).any()
    assert torch.signbit(dequantize_fp4(packed, torch.ones(2), (128,), dtype=torch.float32, negative_zero=True)).all()
    theirs, state = bnbF.quantize_4bit(torch.randn(4, 40), blocksize=64, quant_type="fp4")
    theirs.view(-1)[:3] = 0x88
    assert bnb_cpu_dequantize_path((4, 40), 64) == "scalar"  # row of 40: never the AVX-512 branch
    public = bnbF.dequantize_4bit(theirs, state).reshape(-1)
    assert torch.signbit(public[:6]).all() and (public[:6] == 0).all(), "bitsandbytes' scalar kernel changed its zero"


@pytest.mark.parametrize("shape,blocksize,path", [((7, 13), 64, "reference"), ((4, 40), 64, "scalar"), ((3, 5, 67), 256, "reference")])
def test_paths_that_do_not_depend_on_the_cpu(shape, blocksize, path):
    assert bnb_cpu_dequantize_path(shape, blocksize) == path


def test_ties_go_to_the_lower_level():
    w = make_input((1, 64), torch.float32, "ties", "nf4")
    packed, absmax = quantize_nf4(w)
    codes = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], -1).view(-1)
    assert codes[1:16].tolist() == list(range(15))  # midpoint j lies between levels j and j+1: code j


@pytest.mark.parametrize("offset", [0.9677083])
def test_levels_derive_from_normal_quantiles(offset):
    assert torch.equal(normal_float_levels(offset), bnbF.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("bad_blocksize", [0, 32, 48, 96, 100, 63, 64.0])
def test_bad_blocksize(bad_blocksize):
    with pytest.raises(ValueError, match="power of two >= 64"):
        quantize_nf4(torch.randn(128), blocksize=bad_blocksize)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool, torch.uint8])
def test_not_floating(dtype):
    with pytest.raises(TypeError, match="floating-point"):
        quantize_nf4(torch.zeros(64, dtype=dtype))


# Double quantisation: bitsandbytes' quantize_4bit(..., compress_statistics=True), every part of the nested state.
DQ_CASES = list(itertools.product(DTYPES, [64, 256, 4096], [(64, 512), (300, 256), (7, 13), (40000,), (3, 5, 67)]))


@pytest.mark.parametrize("dtype,blocksize,shape", DQ_CASES,
                         ids=[f"{str(d)[6:]}-{b}-{'x'.join(map(str, s))}" for d, b, s in DQ_CASES])
def test_double_quant_bit_identical(dtype, blocksize, shape):
    from peftlab.quant.double_quant import quantize_nf4_dq, dequantize_nf4_dq, dequantize_absmax
    from peftlab.quant.blockwise8 import dynamic_map
    w = make_input(shape, dtype, "normal", "nf4", seed=blocksize)
    theirs, state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    q = quantize_nf4_dq(w, blocksize)
    assert torch.equal(q.packed, theirs)
    assert torch.equal(q.absmax, state.absmax), "8-bit absmax codes differ"
    assert torch.equal(q.absmax_scale, state.state2.absmax), "absmax scales (state2.absmax) differ"
    assert torch.equal(q.absmax_offset, state.offset), "offset differs"
    assert torch.equal(dynamic_map(), state.state2.code)
    absmax = dequantize_absmax(q.absmax, q.absmax_scale, q.absmax_offset)
    assert torch.equal(absmax, bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset)
    ours = dequantize_nf4_dq(q, dtype)
    reference = _dequantize_4bit_compute(theirs.reshape(-1), absmax, NF4_CODE, blocksize, shape, dtype)
    assert torch.equal(bits(ours), bits(reference))
    if bnb_cpu_dequantize_sound(shape, blocksize):
        assert torch.equal(bits(ours).reshape(-1), bits(bnbF.dequantize_4bit(theirs, state)).reshape(-1))
