"""The Triton kernels themselves, on CPU: runs tests/kernels_interpret/interpret_*.py in a fresh Python with TRITON_INTERPRET=1.

Triton picks its interpreter when a kernel is defined, and transformers imports triton on import, so the variable
must be set before Python starts: a subprocess. On a GPU the same tests run the compiled kernels (`cuda` marker)."""
import os, subprocess, sys
from pathlib import Path
import pytest, torch

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "tests" / "kernels_interpret"
FILES = ["interpret_utils.py", "interpret_rms_norm.py", "interpret_rope.py", "interpret_swiglu.py",
         "interpret_fused_linear_cross_entropy.py", "interpret_patch.py"]   # nf4 and lora_linear: tests/test_kernels_nf4_lora.py

def _run_suite(interpret:bool):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret: env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *[str(SUITE / f) for f in FILES]]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, f"kernel tests failed ({' '.join(cmd)}):\n{r.stdout[-12000:]}\n{r.stderr[-4000:]}"
    assert " passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-2000:]

def test_kernels_under_the_triton_interpreter(): _run_suite(interpret=True)

@pytest.mark.cuda
def test_kernels_compiled_on_gpu(): _run_suite(interpret=False)
