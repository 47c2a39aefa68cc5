"Write README.md from nbs/index.ipynb (markdown cells, visible code cells and what they print or show).\n\n`--execute` runs the notebook's quick cells first (the tour's `eval: false` cells keep their outputs); `--execute-all` runs the tour too (minutes; in a scratch folder, as it writes `out/`); `--check` fails if README.md is stale."
import sys, tempfile, nbformat
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WIDGET = 'application/vnd.jupyter.widget-view+json'

def _hidden(src): return any(l.strip() in ('#| hide', '#|hide') for l in src.splitlines())

def _outputs(cell):
    texts = []
    for o in cell.get('outputs', []):
        if o.get('output_type') == 'stream':
            if o.get('name') == 'stdout': texts.append(o['text'])  # stderr: progress bars and warnings
        elif WIDGET in o.get('data', {}): continue   # a widget's text form is its constructor call, not what a reader sees
        elif 'text/markdown' in o.get('data', {}): texts.append(('MD', o['data']['text/markdown']))
        elif 'text/plain' in o.get('data', {}): texts.append(o['data']['text/plain'])
    return texts

def render(nb):
    parts = ['<!-- generated from nbs/index.ipynb by tools/readme.py: edit the notebook, not this file -->']
    for c in nb.cells:
        if c.cell_type == 'markdown': parts.append(c.source)
        elif c.cell_type == 'code' and c.source.strip() and not _hidden(c.source):
            src = '\n'.join(l for l in c.source.splitlines() if not l.startswith('#|'))
            parts.append(f'```python\n{src}\n```')
            for t in _outputs(c):
                parts.append(t[1] if isinstance(t, tuple) else f'```\n{t.rstrip()}\n```')
    return '\n\n'.join(parts).rstrip() + '\n'

def _eval_false(cell): return cell.cell_type == 'code' and any(l.replace(' ', '') == '#|eval:false' for l in cell.source.splitlines())

def execute(path, everything=False):
    "Run the notebook at `path` (all of it, or all but its `eval: false` cells) and store its outputs, so the README shows them."
    from execnb.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    from fastcore.xtras import working_directory
    from nbdev.clean import nbdev_clean
    nb = read_nb(path)
    with tempfile.TemporaryDirectory() as scratch, working_directory(scratch):
        CaptureShell().run_all(nb, exc_stop=True, preproc=(lambda c: False) if everything else _eval_false)
    for c in nb.cells:   # progress bars and warnings: not worth keeping in the notebook
        if c.cell_type == 'code': c.outputs = [o for o in c.outputs if not (o.output_type == 'stream' and o.name == 'stderr')]
    write_nb(nb, path)
    nbdev_clean(fname=str(path))

def main():
    if '--execute' in sys.argv or '--execute-all' in sys.argv: execute(ROOT/'nbs'/'index.ipynb', '--execute-all' in sys.argv)
    text = render(nbformat.read(ROOT/'nbs'/'index.ipynb', as_version=4))
    readme = ROOT/'README.md'
    if '--check' in sys.argv:
        if not readme.exists() or readme.read_text() != text:
            sys.exit('README.md is stale: run `make readme` (it is generated from nbs/index.ipynb)')
        print('README.md is current')
    else: readme.write_text(text)

if __name__ == '__main__': main()
