"Every `#| slow` cell in nbs/ does its long work through `peftlab.core.slow.run_slow`, so that JupyterLab's \"Run All\" shows recorded results in seconds unless PEFTLAB_SLOW=1."
import ast, contextlib, io, json, time
from pathlib import Path
import pytest
import peftlab.core.slow
import sys
sys.path.insert(0, str(Path(__file__).resolve().parent.parent/"tools"))
from slow import directives as flags   # the leading `#|` words of a cell (`#| slow` -> {'slow'}), as make slow reads them

NBS = Path(__file__).resolve().parent.parent/"nbs"

def notebooks():
    return sorted(p for p in NBS.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts and not p.name.startswith("_"))

def code_cells(path:Path)->list[str]:
    return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]

SLOW = [(p, src) for p in notebooks() for src in code_cells(p) if "slow" in flags(src)]
IDS = [str(p.relative_to(NBS)) for p, _ in SLOW]

def test_slow_cells_found():
    assert len(SLOW) >= 30, f"only {len(SLOW)} slow cells found under {NBS}"
    assert "tutorials/00_lowrank_family.ipynb" in IDS   # the 55-minute run
    assert flags("#| slow\nx = 1") == {"slow"} and flags("#| eval: false\n#| slow\n") == {"eval:", "false", "slow"}
    assert flags("x = 1  #| slow") == set() and flags('"#| slow" in a docstring') == set()

def _is_run_slow(node)->bool:
    call = node.value if isinstance(node, (ast.Expr, ast.Assign)) else None
    return isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "run_slow"

def _is_cheap(node)->bool:
    "Imports, function definitions and constants: what a slow cell may do outside `run_slow`."
    if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef)): return True
    if isinstance(node, ast.Assign):
        try: ast.literal_eval(node.value); return True
        except ValueError: return False
    return False

@pytest.mark.parametrize("path,source", SLOW, ids=IDS)
def test_slow_cell_uses_run_slow(path, source):
    "Its long work is a function handed to `run_slow`, the cell's last statement; nothing else runs."
    *head, last = ast.parse(source).body
    assert _is_run_slow(last), f"{path.name}: a #| slow cell must end with run_slow(long_run, ...) (see nbs/core/19_slow.ipynb)"
    costly = [ast.get_source_segment(source, n).splitlines()[0] for n in head if not _is_cheap(n)]
    assert not costly, f"{path.name}: move this work into the function given to run_slow: {costly}"
    imports = [n for n in head if isinstance(n, ast.ImportFrom) and n.module == "peftlab.core.slow"]
    assert imports or "run_slow" in "".join(code_cells(path)).split("#| slow")[0], f"{path.name}: import run_slow from peftlab.core.slow"

def _imports(path:Path)->str:
    "Every top-level import statement in the notebook, in order, and its module's names: the names a slow cell can use."
    lines = []
    for src in code_cells(path):
        if "slow" in flags(src): continue
        try: tree = ast.parse(src)
        except SyntaxError: continue   # cell magics
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module == "__future__": continue
            if isinstance(node, (ast.Import, ast.ImportFrom)): lines.append(ast.get_source_segment(src, node))
        d = [l for l in src.splitlines() if l.startswith("#| default_exp")]
        if d: lines.append(f"from peftlab.{d[0].split()[-1]} import *")
    return "\n".join(lines)

@pytest.mark.parametrize("path,source", SLOW, ids=IDS)
def test_slow_cell_shows_recorded_results_at_once(path, source, monkeypatch):
    "With PEFTLAB_SLOW unset the cell runs in its notebook's folder, as a kernel would, and returns within seconds."
    monkeypatch.delenv("PEFTLAB_SLOW", raising=False)
    monkeypatch.chdir(path.parent)
    ns = {"__name__": "__main__"}
    exec(_imports(path), ns)                      # the notebook's imports, not timed
    out = io.StringIO(); start = time.time()
    with contextlib.redirect_stdout(out): exec(compile(source, str(path), "exec"), ns)
    assert time.time() - start < 10, f"{path.name}: slow cell took {time.time() - start:.1f} s with PEFTLAB_SLOW unset"
    assert "Recorded results (set PEFTLAB_SLOW=1" in out.getvalue()

@pytest.mark.parametrize("path,source", SLOW, ids=IDS)
def test_slow_cell_hands_its_work_to_run_slow(path, source, monkeypatch):
    "With PEFTLAB_SLOW=1 the cell hands its own work function to `run_slow` (which then calls it: nbs/core/19_slow.ipynb)."
    monkeypatch.setenv("PEFTLAB_SLOW", "1")
    seen = []
    monkeypatch.setattr(peftlab.core.slow, "run_slow", lambda work, **kw: seen.append((work, peftlab.core.slow.slow_enabled())))
    ns = {"__name__": "__main__"}
    exec(compile(source, str(path), "exec"), ns)
    assert len(seen) == 1 and seen[0][1], f"{path.name}: run_slow was called {len(seen)} times"
    assert seen[0][0].__code__.co_filename == str(path), f"{path.name}: run_slow's work is not a function this cell defines"
