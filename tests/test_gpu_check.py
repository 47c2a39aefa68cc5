"The prepared GPU check (`kernels/gpu_check.sh`) runs here in its `--cpu-smoke` form: every step, nothing timed."
import json, subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_smoke_runs_every_step(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "kernels" / "gpu_check.sh"), "--cpu-smoke", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    [summary] = tmp_path.glob("gpu-check-cpu-smoke-*.json")
    result = json.loads(summary.read_text())
    assert result["device"] == "cpu-smoke"
    steps = {s["step"]: s for s in result["steps"]}
    assert list(steps) == ["kernel-tests", "notebook-cuda-cells", "kernel-bench", "smollm2-bench"]
    assert all(s["status"] == 0 for s in steps.values()), steps
    bench = json.loads((tmp_path / "qlora-step-cpu-smoke.json").read_text())
    implementations = {(row["method"], row["implementation"]) for row in bench["rows"]}
    assert {("qlora", "peftlab"), ("qlora", "peft+bnb"), ("qlora", "peftlab / peft+bnb"), ("lora", "peftlab / peft")} <= implementations
    assert list(tmp_path.glob("cpu-reference-only-*.json")), "the kernel benchmark's CPU form wrote no results"


def test_unknown_option_is_an_error():
    r = subprocess.run(["bash", str(ROOT / "kernels" / "gpu_check.sh"), "--fast"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "unknown option --fast" in r.stderr
