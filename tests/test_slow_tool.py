"`make slow` (tools/slow.py): a notebook's slow cells run for real, in the notebook's folder, after the cells they use."
import json, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT/"tools"))
import slow

def notebook(path:Path, sources:list[str]):
    cells = [dict(cell_type="code", execution_count=None, metadata={}, outputs=[], source=s) for s in sources]
    path.write_text(json.dumps(dict(cells=cells, metadata={}, nbformat=4, nbformat_minor=5)))
    return path

SLOW_CELL = ('#| slow\nfrom peftlab.core.slow import run_slow\nimport json\n'
             'def long_run():\n    open("{out}", "w").write(json.dumps(dict(x=BASE + {k}))); return {k}\n'
             'run_slow(long_run, recorded="not run yet")')

def test_cells_to_run():
    cells = ["a = 1", "#| eval: false\nboom()", "#| slow\nx", "#| cuda\ny", "b = 2", "#| slow\nz", "after = 3"]
    assert slow.to_run(cells) == ["a = 1", "#| slow\nx", "b = 2", "#| slow\nz"]
    assert slow.to_run(cells, {0}) == ["a = 1", "#| slow\nx"]
    assert slow.to_run(cells, {1}) == ["a = 1", "b = 2", "#| slow\nz"]
    assert slow.to_run(["a = 1"]) == [] and slow.to_run(cells, {5}) == []
    assert slow.parse("nbs/x.ipynb") == (Path("nbs/x.ipynb"), None)
    assert slow.parse("nbs/x.ipynb:0,2") == (Path("nbs/x.ipynb"), {0, 2})

def test_runs_slow_cells_in_the_notebooks_folder(tmp_path):
    nb = notebook(tmp_path/"demo.ipynb", ["BASE = 40", SLOW_CELL.format(out="first.json", k=1), SLOW_CELL.format(out="second.json", k=2)])
    proc = subprocess.run([sys.executable, str(ROOT/"tools"/"slow.py"), f"{nb}:1"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path/"second.json").read_text()) == dict(x=42)   # the default cell ran first; written beside the notebook
    assert not (tmp_path/"first.json").exists()                              # the slow cell not chosen did not run
    assert "demo.ipynb: a slow cell took" in proc.stdout

def test_a_failing_cell_stops_with_its_error(tmp_path):
    nb = notebook(tmp_path/"bad.ipynb", ["1 / 0", SLOW_CELL.format(out="never.json", k=1)])
    proc = subprocess.run([sys.executable, str(ROOT/"tools"/"slow.py"), str(nb)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and "cell 0 failed" in proc.stderr and "ZeroDivisionError" in proc.stderr
    assert not (tmp_path/"never.json").exists()

def test_refuses_what_it_cannot_run(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT/"tools"/"slow.py"), str(tmp_path/"missing.ipynb")], capture_output=True, text=True)
    assert proc.returncode != 0 and "no such notebook" in proc.stderr
    nb = notebook(tmp_path/"plain.ipynb", ["a = 1"])
    proc = subprocess.run([sys.executable, str(ROOT/"tools"/"slow.py"), str(nb)], capture_output=True, text=True)
    assert proc.returncode != 0 and "no `#| slow` cell to run" in proc.stderr

def test_lists_what_is_not_run_yet():
    pending = [p.relative_to(ROOT).as_posix() for p in slow.pending()]
    assert all(p.startswith("nbs/") and p.endswith(".ipynb") for p in pending)
    assert "nbs/adapters/01_dora.ipynb" not in pending   # its SmolLM2 results are recorded

RECORDED_CELL = ('#| slow\nfrom peftlab.core.slow import run_slow\nimport json\nRESULTS = "{out}"\n'
                 'def long_run():\n    open(RESULTS, "w").write(json.dumps(dict(x=BASE + {k}))); return {k}\n'
                 'run_slow(long_run, results=RESULTS)')

def test_runs_only_what_is_not_recorded_unless_asked(tmp_path):
    nb = notebook(tmp_path/"mixed.ipynb", ["BASE = 40", RECORDED_CELL.format(out="kept.json", k=1), SLOW_CELL.format(out="new.json", k=2),
                                           RECORDED_CELL.format(out="missing.json", k=3)])
    (tmp_path/"kept.json").write_text('{"x": 0}')                          # recorded: its file is there
    assert slow.pending_cells(nb) == {1, 2}                                 # "not run yet", and a results file not written
    run = lambda *args: subprocess.run([sys.executable, str(ROOT/"tools"/"slow.py"), *args], capture_output=True, text=True, cwd=ROOT)
    proc = run(str(nb))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path/"kept.json").read_text()) == dict(x=0)      # the recorded numbers stay as they were
    assert json.loads((tmp_path/"new.json").read_text()) == dict(x=42) and json.loads((tmp_path/"missing.json").read_text()) == dict(x=43)
    (tmp_path/"new.json").unlink()
    notebook(nb, ["BASE = 40", RECORDED_CELL.format(out="kept.json", k=1), RECORDED_CELL.format(out="missing.json", k=3)])
    proc = run(str(nb))
    assert proc.returncode != 0 and "every slow cell has its results recorded" in proc.stderr and "--all" in proc.stderr
    assert run("--all", str(nb)).returncode == 0 and json.loads((tmp_path/"kept.json").read_text()) == dict(x=41)   # --all: again
