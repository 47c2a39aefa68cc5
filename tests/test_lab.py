"""`make lab`: JupyterLab on nbs/ with this environment's kernel, registered as `peftlab`. The front page runs
through a real kernel of that kind, as a reader's JupyterLab runs it; JupyterLab serves the notebooks and starts
the kernel; and re-running a tutorial's default cells gives the numbers committed in it (on the kind of machine that
stored them; elsewhere the same outputs)."""
import functools, json, os, re, secrets, socket, subprocess, sys, time, urllib.request
from pathlib import Path
import nbformat, pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

@pytest.fixture(scope='module')
def jupyter_env(tmp_path_factory):
    "The `peftlab` kernel registered as `make lab` registers it, into a throwaway prefix; the env that finds it."
    tmp = tmp_path_factory.mktemp('jupyter')
    subprocess.run([sys.executable, '-m', 'ipykernel', 'install', '--prefix', str(tmp/'prefix'), '--name', 'peftlab',
                    '--display-name', 'peftlab (.venv)'], check=True, capture_output=True)
    return {**os.environ, 'JUPYTER_PATH': str(tmp/'prefix'/'share'/'jupyter'), 'JUPYTER_CONFIG_DIR': str(tmp/'config'),
            'JUPYTER_RUNTIME_DIR': str(tmp/'runtime'), 'OMP_NUM_THREADS': '1', 'PEFTLAB_SLOW': ''}

def test_make_lab_registers_the_kernel_and_opens_nbs():
    out = subprocess.run(['make', '-n', 'lab'], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert re.search(r'-m ipykernel install --sys-prefix --name peftlab\b', out), out
    assert re.search(r'/jupyter lab nbs/ ', out), out

def test_kernelspec_is_this_environment(jupyter_env):
    spec = json.loads((Path(jupyter_env['JUPYTER_PATH'])/'kernels'/'peftlab'/'kernel.json').read_text())
    assert Path(spec['argv'][0]).resolve() == Path(sys.executable).resolve() and spec['language'] == 'python'

def run_in_kernel(nb, env, cwd, timeout=600):
    "Execute `nb` in the `peftlab` kernel with nbclient, as JupyterLab would; stops at the first error."
    from nbclient import NotebookClient
    old = dict(os.environ)
    os.environ.update(env)
    try: NotebookClient(nb, kernel_name='peftlab', timeout=timeout, resources={'metadata': {'path': str(cwd)}}).execute()
    finally: os.environ.clear(); os.environ.update(old)
    return nb

def test_index_runs_in_the_peftlab_kernel(jupyter_env):
    nb = nbformat.read(ROOT/'nbs'/'index.ipynb', as_version=4)
    for c in nb.cells:       # as nbdev_test and the site: `#| eval: false` and un-gated slow cells are not run
        if c.cell_type == 'code' and _skipped(c.source): c.source = ''
    nb.cells.append(nbformat.v4.new_code_cell('import sys, os; print(sys.prefix); print(os.getcwd())'))
    run_in_kernel(nb, jupyter_env, ROOT/'nbs')
    code = [c for c in nb.cells if c.cell_type == 'code' and c.source.strip()]
    assert all(c.execution_count for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == 'error']
    prefix, cwd = code[-1].outputs[0].text.split()
    assert Path(prefix).resolve() == Path(sys.prefix).resolve() and Path(cwd).resolve() == ROOT/'nbs'

def _free_port():
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def test_lab_serves_the_notebooks_and_starts_the_kernel(jupyter_env):
    port, token = _free_port(), secrets.token_hex(16)
    proc = subprocess.Popen([str(BIN/'jupyter'), 'lab', 'nbs/', '--no-browser', f'--port={port}', '--ip=127.0.0.1',
                             f'--IdentityProvider.token={token}', *(['--allow-root'] if os.geteuid() == 0 else [])], cwd=ROOT, env=jupyter_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f'http://127.0.0.1:{port}'
    def get(path, method='GET', data=None):
        req = urllib.request.Request(base + path, method=method, data=data, headers={'Authorization': f'token {token}'})
        with urllib.request.urlopen(req, timeout=30) as r: return r.status, r.read().decode()
    try:
        for _ in range(120):
            try: get('/api/status'); break
            except OSError: time.sleep(0.5)
            if proc.poll() is not None: pytest.fail(f'jupyter lab exited: {proc.stderr.read().decode()[-2000:]}')
        assert 'peftlab' in json.loads(get('/api/kernelspecs')[1])['kernelspecs']
        assert json.loads(get('/api/contents/index.ipynb')[1])['type'] == 'notebook'          # nbs/ is the root
        assert {'core', 'tutorials'} <= {c['name'] for c in json.loads(get('/api/contents')[1])['content']}
        status, page = get('/lab/tree/index.ipynb')
        assert status == 200 and 'jupyter-config-data' in page
        status, body = get('/api/kernels', 'POST', json.dumps({'name': 'peftlab'}).encode())
        kernel = json.loads(body)
        assert status == 201 and kernel['name'] == 'peftlab'
        get(f"/api/kernels/{kernel['id']}", 'DELETE')
    finally:
        proc.terminate()
        try: proc.wait(20)
        except subprocess.TimeoutExpired: proc.kill()

# ---------------------------------------------------------------------------------------------------------
# the tutorials keep their outputs; re-running their default (non-slow) cells gives the same numbers

TUTORIALS = sorted(p for p in (ROOT/'nbs'/'tutorials').glob('*.ipynb') if not p.name.startswith('_'))
TIMING = re.compile(r'sec|time|\bms\b|_s$|per_s|speed|throughput|it/s|s/it|tok/s|elapsed|wall', re.I)

@functools.cache
def _docs():
    "tools/docs.py as a module, loaded once."
    import importlib.util
    spec = importlib.util.spec_from_file_location('peftlab_docs', ROOT/'tools'/'docs.py')
    docs = importlib.util.module_from_spec(spec); spec.loader.exec_module(docs)
    return docs

def _skipped(src): return _docs().skipped(src)

def _tables(html):
    "Rows of the html tables in `html`, each a dict of header -> cell text."
    from html.parser import HTMLParser
    class P(HTMLParser):
        def __init__(s): super().__init__(); s.rows, s.row, s.cell = [], None, None
        def handle_starttag(s, t, a):
            if t == 'tr': s.row = []
            elif t in ('td', 'th'): s.cell = ''
        def handle_endtag(s, t):
            if t in ('td', 'th') and s.row is not None: s.row.append(s.cell.strip()); s.cell = None
            elif t == 'tr' and s.row is not None: s.rows.append(s.row); s.row = None
        def handle_data(s, d):
            if s.cell is not None: s.cell += d
    p = P(); p.feed(html)
    if not p.rows: return []
    head = p.rows[0]
    return [dict(zip(head, r)) for r in p.rows[1:] if len(r) == len(head)]

_num = re.compile(r'(?<![\w.])-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?!\w)')
def _nums(text): return _num.findall(re.sub(r'0x[0-9a-fA-F]+', '', text))   # object addresses are not results

def numbers(outputs):
    "The numbers a cell shows (timings left out: they are not seeded), as (where, text) pairs."
    res = []
    for o in outputs:
        if o.output_type == 'stream' and o.name == 'stdout':
            for line in o.text.splitlines():
                if not TIMING.search(line): res += [('stdout', x) for x in _nums(line)]
        elif o.output_type in ('execute_result', 'display_data'):
            d = o.data
            if 'text/html' in d and '<table' in d['text/html']:
                for i, row in enumerate(_tables(d['text/html'])):
                    res += [(f'row {i} {k}', x) for k, v in row.items() if not TIMING.search(k) for x in _nums(v)]
            elif 'text/plain' in d and not any(k.startswith('image/') for k in d):
                res += [('text', x) for x in _nums(d['text/plain']) if not TIMING.search(d['text/plain'])]
    return res

def shape(outputs):
    "What a cell shows, without its values: each table's columns and row count, each printed line count, each figure (not progress bars)."
    res = []
    for o in outputs:
        if o.output_type == 'stream':
            if o.name == 'stdout': res.append((o.name, len(o.text.splitlines())))   # stderr: progress bars and warnings
        elif o.output_type in ('execute_result', 'display_data'):
            d = o.data
            if 'application/vnd.jupyter.widget-view+json' in d: continue          # a progress bar drawn by the kernel
            if 'text/html' in d and '<table' in d['text/html']:
                rows = _tables(d['text/html']); res.append(('table', tuple(rows[0]) if rows else (), len(rows)))
            else: res.append(tuple(sorted(d)))
        else: res.append(o.output_type)
    return res

def same_number(a:str, b:str)->bool:
    "Equal to the precision shown (one unit of the last printed digit, or 1e-3 relative); integers exactly."
    x, y = float(a), float(b)
    if re.fullmatch(r'-?\d+', a): return x == y
    unit = 10.0 ** -len(a.split('.')[1].split('e')[0].split('E')[0]) if '.' in a and 'e' not in a.lower() else 0
    return abs(x - y) <= max(unit, 1e-3 * abs(x), 1e-12)

def test_numbers_compare_to_the_precision_shown():
    assert same_number('10.38', '10.38') and same_number('10.38', '10.39') and not same_number('10.38', '10.41')
    assert same_number('16384', '16384') and not same_number('16384', '16400')
    out = nbformat.v4.new_output('execute_result', {'text/html': '<table><tr><th></th><th>trainable</th><th>sec_per_step</th>'
                                 '</tr><tr><th>lora</th><td>16384</td><td>1.97</td></tr></table>', 'text/plain': 'x'})
    assert numbers([out]) == [('row 0 trainable', '16384')]        # the timing column is left out
    assert shape([out]) == [('table', ('', 'trainable', 'sec_per_step'), 1)]
    bar = [nbformat.v4.new_output('stream', name='stderr', text='fit: 100%|##########| 12/12\n'),
           nbformat.v4.new_output('display_data', {'application/vnd.jupyter.widget-view+json': {}, 'text/plain': 'fit'})]
    assert shape(bar + [out]) == shape([out])                        # progress bars, as a widget or as text, are not shown results

@pytest.mark.parametrize('path', TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_reproduces_its_committed_numbers(path, jupyter_env, tmp_path):
    import copy, shutil
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    nb = nbformat.read(path, as_version=4)
    committed = {i: c for i, c in enumerate(nb.cells) if c.cell_type == 'code' and c.outputs and not _skipped(c.source)}
    assert committed, (f'{rel} carries no outputs: run `make tutorials` (its default cells, seeded) and commit it, '
                       'so readers see its tables and plots')
    assert any('image/png' in o.get('data', {}) for c in committed.values() for o in c.outputs) or \
           not any(re.search(r'\.plot\(|plt\.', c.source) for c in committed.values())
    # nbdev_clean keeps them (settings.ini: clear_all = False)
    shutil.copytree(path.parent, tmp_path/'clean')
    subprocess.run([str(BIN/'nbdev_clean'), '--fname', str(tmp_path/'clean'/path.name)], cwd=ROOT, check=True)
    cleaned = nbformat.read(tmp_path/'clean'/path.name, as_version=4)
    assert [len(c.get('outputs', [])) for c in cleaned.cells] == [len(c.get('outputs', [])) for c in nb.cells]
    # re-run in a copy of its folder (it writes results/ beside itself), slow cells left out unless gated
    shutil.copytree(path.parent, tmp_path/'run')
    fresh = copy.deepcopy(nb)
    for c in fresh.cells:
        if c.cell_type == 'code':
            c.outputs = []
            if _skipped(c.source): c.source = ''
    t = time.time()
    run_in_kernel(fresh, jupyter_env, tmp_path/'run', timeout=900)
    print(f'{rel}: re-ran in {time.time() - t:.0f}s')
    # another kind of CPU rounds float32 differently and tens of training steps carry it into the printed digits:
    # there the tutorial must show the same outputs (every table with its columns and rows, every line, every figure), not the same digits
    docs = _docs()
    stored, here = docs.stored_on(path), docs.float_machine()
    assert stored, f'{rel}: {docs.MACHINES} beside it does not say which machine stored its outputs: run `make tutorials`'
    for i, c in committed.items():
        assert shape(c.outputs) == shape(fresh.cells[i].outputs), f'{rel}, cell {i}: different output\n{c.source}'
        if stored != here: continue
        old, new = numbers(c.outputs), numbers(fresh.cells[i].outputs)
        assert [w for w, _ in old] == [w for w, _ in new], f'{rel}, cell {i}: different output\n{c.source}'
        bad = [(w, a, b) for (w, a), (_, b) in zip(old, new) if not same_number(a, b)]
        assert not bad, f'{rel}, cell {i}: numbers differ from the committed ones (where, committed, now): {bad[:10]}\n{c.source}'
    if stored != here: print(f'{rel}: outputs stored on "{stored}", run on "{here}": compared their shape, not their digits')
