"The README's quick tour as a reader runs it: every ```python block of README.md, in order, pasted into one fresh Python process."
import json, os, re, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT/"README.md"

def python_blocks(text:str)->list[str]:
    "The bodies of the ```python fenced blocks in `text`, in order (plain ``` blocks are illustrations, not run)."
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)

def test_python_blocks():
    test_text = "intro\n```python\na = 1\n```\n```bash\nmake demo\n```\n```\nnot run\n```\n```python\nb = a\n```\n"
    assert python_blocks(test_text) == ["a = 1\n", "b = a\n"]
    assert torchrun_lines("```bash\nmake demo\ntorchrun --nproc_per_node 2 x\n```\n") == ["torchrun --nproc_per_node 2 x"]
    blocks = python_blocks(README.read_text())
    for step in ("pl.load_model(", "pl.apply(", "pl.fit(", "pl.evaluate(", "pl.save_adapter(", "pl.load_adapter(", "pl.merge("):
        assert any(step in b for b in blocks), f"the README's tour lost its {step} step"

def torchrun_lines(text:str)->list[str]:
    "The `torchrun` commands of the README's ```bash blocks (the other shell lines are `make` targets, tested elsewhere)."
    bash = re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)
    return [l.strip() for b in bash for l in b.splitlines() if l.strip().startswith("torchrun ")]

RESULT = 'import json; print("TOUR", json.dumps(dict(before=before["accuracy"], after=after["accuracy"])))'

def test_readme_runs_as_written(tmp_path):
    "The blocks succeed in a fresh process (threads as the environment gives them), and training raised held-out accuracy."
    script = tmp_path/"tour.py"
    script.write_text("\n\n".join(python_blocks(README.read_text()) + [RESULT]) + "\n")
    start = time.time()
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"the README's python blocks failed:\n{proc.stderr[-4000:]}"
    res = json.loads([l for l in proc.stdout.splitlines() if l.startswith("TOUR ")][-1][5:])
    assert res["after"] > res["before"], f"held-out exact match did not improve: {res}"
    assert (tmp_path/"out"/"adapter_config.json").exists() and (tmp_path/"out"/"adapter_model.safetensors").exists()
    print(f"README tour: {time.time() - start:.0f} s; held-out exact match {res['before']:.2f} -> {res['after']:.2f}")

def test_readme_torchrun(tmp_path):
    "The README's torchrun command trains and saves an adapter, with the environment's `peftlab` on PATH."
    lines = torchrun_lines(README.read_text())
    assert lines, "the README shows no torchrun command"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    for line in lines:
        proc = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{line}\n{proc.stderr[-4000:]}"
        out = re.search(r"--out (\S+)", line).group(1)
        assert (tmp_path/out/"adapter_model.safetensors").exists(), f"{line} saved no adapter in {out}"
