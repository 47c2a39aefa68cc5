"""Run notebooks' `#| slow` cells for real (`PEFTLAB_SLOW=1`), so their results files are written.

Each notebook runs in its own folder, as a kernel would: every code cell up to its last `#| slow` cell, in
order (the default cells define what the slow ones use), leaving out `#| eval: false` and `#| cuda` cells.
What a slow cell writes (a JSON file under the notebook's `results/`) is what its prose and assertions read
back; the notebook itself is not changed. One notebook after another, with each slow cell's time printed.
By default only the slow cells whose results are not recorded yet run (re-running a recorded cell rewrites
the numbers its prose quotes): name cells with `:i` or pass `--all` to run recorded ones again.

    python tools/slow.py nbs/adapters/10_ssf.ipynb nbs/adapters/11_loldu.ipynb   # their slow cells not recorded yet
    python tools/slow.py nbs/adapters/52_velora_monteclora.ipynb:0   # only its first slow cell (0-based), recorded or not
    python tools/slow.py --all nbs/adapters/10_ssf.ipynb            # every slow cell, recorded ones again
    python tools/slow.py --list                  # notebooks with slow cells whose results are not recorded yet
"""
import argparse, json, os, re, subprocess, sys, time, traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT/'nbs'
NOT_RUN = 'not run yet'   # what a slow cell's `recorded=` says until its results are recorded

def directives(src:str)->set[str]:
    "The words of a cell's leading `#|` lines (`#| eval: false` -> {'eval:', 'false'})."
    out = set()
    for line in src.splitlines():
        if not line.startswith('#|'): break
        out |= set(line[2:].replace(',', ' ').split())
    return out

def code_cells(nb:Path)->list[str]:
    return [''.join(c['source']) for c in json.loads(nb.read_text())['cells'] if c['cell_type'] == 'code']

def is_slow(src:str)->bool: return 'slow' in directives(src)

def to_run(cells:list[str], which:set[int]|None=None)->list[str]:
    "The cells to run: up to the last chosen slow one (`which`: their order among slow cells; all by default), without the others, `eval: false` and `cuda` cells."
    slow = [i for i, s in enumerate(cells) if is_slow(s)]
    chosen = [i for k, i in enumerate(slow) if which is None or k in which]
    if not chosen: return []
    skip = lambda i, s: ({'cuda'} & directives(s) or {'eval:', 'false'} <= directives(s) or (i in slow and i not in chosen))
    return [s for i, s in enumerate(cells[:chosen[-1] + 1]) if not skip(i, s)]

def parse(arg:str)->tuple[Path, set[int]|None]:
    "`nbs/x.ipynb` (every slow cell) or `nbs/x.ipynb:0,2` (its first and third slow cells)."
    path, _, picks = arg.partition('.ipynb:')
    if not picks: return Path(arg), None
    return Path(path + '.ipynb'), {int(k) for k in picks.split(',')}

RESULTS_FILE = re.compile(r'''\bRESULTS\s*=\s*["']([^"']+)["']|\bresults\s*=\s*["']([^"']+)["']''')

def is_recorded(src:str, folder:Path)->bool:
    "A slow cell's results are recorded unless it says they are not, or the results file it names is not beside its notebook."
    files = [a or b for a, b in RESULTS_FILE.findall(src)]
    return NOT_RUN not in src and all((folder/f).exists() for f in files)

def pending_cells(nb:Path)->set[int]:
    "The order, among `nb`'s slow cells, of those whose results are not recorded."
    return {k for k, s in enumerate(s for s in code_cells(nb) if is_slow(s)) if not is_recorded(s, nb.parent)}

def pending()->list[Path]:
    "Notebooks with a slow cell whose results are not recorded."
    return sorted(p for p in NBS.rglob('*.ipynb') if '.ipynb_checkpoints' not in p.parts and pending_cells(p))

def run_notebook(nb:Path, which:set[int]|None=None)->float:
    "Run `nb`'s cells up to its last (chosen) slow cell with slow work on; the seconds its slow cells took."
    from execnb.shell import CaptureShell
    cells = to_run(code_cells(nb), which)
    if not cells: raise SystemExit(f'{nb}: no `#| slow` cell to run' + (f' among {sorted(which)}' if which else ''))
    os.environ['PEFTLAB_SLOW'] = '1'
    os.chdir(nb.parent)
    shell = CaptureShell(path=nb.parent)
    slow_seconds = 0.0
    for i, src in enumerate(cells):
        start = time.time()
        shell.run(src)
        if shell.exc: raise SystemExit(f'{nb}: cell {i} failed:\n' + ''.join(traceback.format_exception(shell.exc))[-3000:])
        if is_slow(src):
            slow_seconds += time.time() - start
            print(f'{nb.name}: a slow cell took {time.time() - start:.0f} s', flush=True)
    return slow_seconds

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('notebooks', nargs='*', help='notebooks, each optionally with :i,j (which of its slow cells)')
    ap.add_argument('--list', action='store_true', help='list notebooks whose slow results are not recorded yet')
    ap.add_argument('--all', action='store_true', help='run every slow cell of the notebooks named, recorded ones again')
    ap.add_argument('--one', help=argparse.SUPPRESS)   # run one notebook in this process
    args = ap.parse_args()
    if args.one: return run_notebook(*parse(args.one))
    if args.list:
        for p in pending(): print(p.relative_to(ROOT))
        return
    if not args.notebooks: ap.error('name the notebooks to run (or --list)')
    missing = [a for a in args.notebooks if not parse(a)[0].exists()]
    if missing: ap.error(f'no such notebook: {", ".join(missing)}')
    for arg in args.notebooks:   # one process each: a notebook's names and working folder are its own
        path, which = parse(arg)
        if which is None and not args.all and any(is_slow(s) for s in code_cells(path)):
            which = pending_cells(path)
            if not which: sys.exit(f'{path}: every slow cell has its results recorded: name one (`{path}:0`) or pass --all to run them again')
        r = subprocess.run([sys.executable, __file__, '--one', str(path.resolve()) + (':' + ','.join(map(str, sorted(which))) if which else '')])
        if r.returncode: sys.exit(r.returncode)

if __name__ == '__main__': main()
