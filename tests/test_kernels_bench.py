"The kernel benchmark harness runs without a GPU: `kernels/bench.py --cpu-smoke` sets up every family and times nothing."
import json, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = ["rms_norm", "rope", "swiglu", "fused_linear_cross_entropy"]

def test_cpu_smoke_runs_every_reference_and_claims_no_speed(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "kernels" / "bench.py"), "--cpu-smoke", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "speed needs a GPU" in r.stdout
    [path] = tmp_path.glob("cpu-reference-only-*.json")
    result = json.loads(path.read_text())
    assert result["mode"] == "cpu-reference-only" and result["device"] == "cpu"
    rows = {row["family"]: row for row in result["rows"]}
    assert set(OURS) <= set(rows) and all(rows[f]["ran"] for f in OURS)
    for f in OURS:
        assert rows[f]["providers"] == ["eager", "peftlab"] and rows[f]["max_abs_diff_peftlab_vs_eager"] == 0.0
    text = path.read_text()
    assert all(k not in text for k in ('"ms"', "GB/s", "TFLOP/s", "tokens_per_s")), "a CPU run must not report speed"
    assert not list(tmp_path.glob("*.png"))

def test_unknown_family_is_an_error():
    r = subprocess.run([sys.executable, str(ROOT / "kernels" / "bench.py"), "--cpu-smoke", "--families", "rmsnorm"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "unknown families ['rmsnorm']" in r.stderr
