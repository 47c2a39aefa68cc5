"The dispatch rule under the interpreter: CPU tensors go to Triton, and the kernels were built as interpreted functions."
import torch
from triton.runtime.interpreter import InterpretedFunction
from kernel_checks import INTERPRET, DEVICE
from peftlab.kernels import utils, rms_norm_kernel as rms_norm, rope_kernel as rope, swiglu_kernel as swiglu, fused_linear_cross_entropy_kernel as flce

def test_use_triton_follows_how_the_kernels_were_built():
    assert utils.INTERPRET == INTERPRET
    assert utils.use_triton(torch.zeros(2, device=DEVICE), None)
    assert not utils.use_triton(torch.zeros(2, device=DEVICE), torch.zeros(2, device="meta"))   # mixed devices
    kernels = [rms_norm._rms_norm_fwd_kernel, rms_norm._rms_norm_bwd_kernel, rope._rope_kernel, swiglu._swiglu_fwd_kernel,
               swiglu._swiglu_bwd_kernel, flce._cross_entropy_kernel]
    assert all(isinstance(k, InterpretedFunction) == INTERPRET for k in kernels)
