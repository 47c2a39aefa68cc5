"""Build the documentation site in `_docs/` from the notebooks in `nbs/`.

Every notebook becomes one page: its markdown, its visible code, and its outputs (tables, plots, recorded
slow results), with each exported function's signature and docstring as nbdev's `show_doc` renders them.
A notebook that already carries outputs is used as it is (only its `show_doc` cells run); the others are
executed in a copy of `nbs/`, one process each, with `#| slow` and `#| cuda` cells left out unless they are
gated by `PEFTLAB_SLOW` (unset here, so they show their recorded results). Math is rendered by a local copy
of MathJax (from the `jupyter-server-mathjax` package), so the site reads offline too.

    python tools/docs.py                       # the whole site into _docs/
    python tools/docs.py --out /tmp/site nbs/index.ipynb nbs/core/03_registry.ipynb
    python tools/docs.py --store-outputs nbs/tutorials/00_lowrank_family.ipynb   # run it, keep its outputs
    python tools/docs.py --check _docs         # every relative link and anchor resolves
"""
import argparse, base64, hashlib, html, json, os, re, shutil, subprocess, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT/'nbs'
ASSETS = Path(__file__).resolve().parent/'docs_assets'
PARTS = [('core', 'Core'), ('adapters', 'Adapters'), ('init', 'Initialisations'), ('quant', 'Quantisation'),
         ('kernels', 'Kernels'), ('optim', 'Optimisers'), ('merge', 'Merging'), ('objectives', 'Objectives'),
         ('sparse', 'Sparse fine-tuning'), ('data', 'Data'), ('analysis', 'Analysis'), ('tutorials', 'Tutorials')]
SKIP_FLAGS = {'slow', 'cuda'}     # settings.ini's tst_flags: cells that nbdev_test leaves out too
SLOW_GATE = 'PEFTLAB_SLOW'        # unset: a gated slow cell shows its recorded results instead of its long work
GATED = re.compile(r'PEFTLAB_SLOW|\brun_slow\(|\bslow_enabled\(')   # how a slow cell is gated (peftlab.core.slow)
EXEC_VERSION = '1'               # bump when execute_one changes what it stores, to drop cached runs
CELL_TIMEOUT = 900                # seconds one cell may take while the site builds

# ---------------------------------------------------------------------------------------------------------
# Notebooks and pages

def notebooks(paths=None):
    "The notebooks to build: `paths`, or every notebook under nbs/ (names starting with `_` or `.` skipped)."
    if paths: return [Path(p).resolve() for p in paths]
    return sorted(p for p in NBS.rglob('*.ipynb')
                  if not any(part.startswith(('_', '.')) for part in p.relative_to(NBS).parts))

def page_of(nb:Path)->str:
    "The page a notebook becomes, relative to the site root: nbs/core/03_registry.ipynb -> core/registry.html."
    rel = nb.resolve().relative_to(NBS)
    stem = re.sub(r'^\d+[a-z]?_', '', rel.stem)
    return (rel.parent/f'{stem}.html').as_posix()

def directives(src:str)->dict:
    "The `#| key: value` lines at the top of a cell's source, as {key: value}."
    res = {}
    for line in src.splitlines():
        s = line.strip()
        if not s: continue
        if not s.startswith('#|'): break
        body = s[2:].strip()
        k, _, v = body.partition(':') if ':' in body.split(' ')[0] else body.partition(' ')
        res[k.strip()] = v.strip()
    return res

def strip_directives(src:str)->str:
    lines = src.splitlines()
    while lines and (lines[0].strip().startswith('#|') or not lines[0].strip()): lines.pop(0)
    return '\n'.join(lines).rstrip()

def has_outputs(nb:dict)->bool:
    "Does the notebook carry outputs already (then the site shows them as they are)?"
    return any(c.get('outputs') for c in nb['cells'] if c['cell_type'] == 'code')

def skipped(src:str)->bool:
    "Is this cell left out when the site's notebooks run? (slow or cuda, unless gated; `eval: false`)"
    d = directives(src)
    if d.get('eval', '').lower() == 'false': return True
    return bool(SKIP_FLAGS & d.keys()) and not GATED.search(src)

def _text(x): return ''.join(x) if isinstance(x, list) else (x or '')

# ---------------------------------------------------------------------------------------------------------
# Executing (one child process per notebook)

def execute_one(src:Path, dest:Path, workdir:Path):
    "Run `src` (a notebook under `workdir`) as the site shows it, and write it with outputs to `dest`."
    from execnb.nbio import read_nb
    from execnb.shell import CaptureShell
    from nbdev.process import NBProcessor
    from nbdev.processors import populate_language, add_show_docs, _do_eval
    os.environ.pop(SLOW_GATE, None)
    nb = read_nb(src)
    stored = has_outputs(nb)
    NBProcessor(nb=nb, procs=[populate_language, add_show_docs]).process()
    for cell in nb.cells:    # nbdev's processor took the `#| ...` lines out of the source: put them back
        d = cell.get('directives_') or {}
        if d: cell.source = ''.join(f"#| {k} {' '.join(v)}".rstrip() + '\n' for k, v in d.items()) + cell.source
    os.chdir(workdir)
    shell = CaptureShell(path=workdir, timeout=CELL_TIMEOUT)
    shell.run_cell('from nbdev.showdoc import show_doc')
    # a config dataclass defined in a notebook inherits fields annotated in its module (`init_data: Any` under
    # `from __future__ import annotations`); show_doc resolves those names in the notebook's namespace
    shell.run_cell('from typing import Any, Callable')
    errors = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != 'code': continue
        if cell.get('has_sd'): cell.metadata['showdoc'] = True
        if skipped(cell.source): cell.metadata['not_run'] = True; continue
        if stored and not cell.get('has_sd'):   # keep the stored outputs; run only what show_doc needs
            if _do_eval(cell): shell.run(cell.source)
            continue
        shell.cell(cell)
        errs = [o for o in cell.get('outputs', []) if o.get('output_type') == 'error']
        if errs: errors.append(f"cell {i}: {errs[0]['ename']}: {errs[0]['evalue']}")
    out = json.loads(json.dumps(nb, default=str))
    for c in out['cells']:
        for k in [k for k in c if k.endswith('_') or k in ('has_sd', 'idx_')]: c.pop(k)
    out['metadata']['docs'] = dict(stored=stored, errors=errors)
    tmp = dest.with_name(f'{dest.name}.{os.getpid()}.tmp')    # whole or not at all: builds may share the cache
    tmp.write_text(json.dumps(out)); tmp.replace(dest)

def _fingerprint(nb:Path)->str:
    "What an executed notebook depends on: itself, the package's source, the files beside it."
    h = hashlib.sha256(nb.read_bytes() + Path(__file__).read_bytes())   # and how this builder executes it
    for p in sorted((ROOT/'peftlab').rglob('*.py')): h.update(p.read_bytes())
    for p in sorted(nb.parent.rglob('*')):
        if p.is_file() and p.suffix != '.ipynb' and '.ipynb_checkpoints' not in p.parts: h.update(p.read_bytes())
    h.update(EXEC_VERSION.encode())
    return h.hexdigest()[:16]

def execute_all(nbs:list, cache:Path, jobs:int=2, log=print)->dict:
    "Executed notebooks by path (from the cache where nothing they depend on changed)."
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix='peftlab-docs-'))
    shutil.copytree(NBS, work/'nbs', ignore=shutil.ignore_patterns('.ipynb_checkpoints'))
    env = {**os.environ, 'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', '1'), 'PYTHONPATH': str(ROOT)}
    env.pop(SLOW_GATE, None)
    def run(nb):
        rel = nb.relative_to(NBS)
        dest = cache/f"{rel.as_posix().replace('/', '__')}.{_fingerprint(nb)}.json"
        if not dest.exists():
            t = time.time()
            copy = work/'nbs'/rel
            r = subprocess.run([sys.executable, __file__, '--execute-one', str(copy), str(dest), str(copy.parent)],
                               env=env, capture_output=True, text=True)
            if r.returncode: raise RuntimeError(f'executing {rel} failed:\n{r.stderr[-3000:]}')
            log(f'  ran {rel} in {time.time() - t:.0f}s')
        return nb, json.loads(dest.read_text())
    try:
        with ThreadPoolExecutor(jobs) as ex: return dict(ex.map(run, nbs))
    finally: shutil.rmtree(work, ignore_errors=True)

MACHINES = 'stored_on.json'    # beside the notebooks whose outputs are stored: which kind of machine made them

def float_machine()->str:
    "The things that decide how float32 results round here: CPU vendor and model, torch's vector kernels, torch's version."
    import platform, torch
    info = {}
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            k, _, v = line.partition(':')
            if k.strip() in ('vendor_id', 'model name') and k.strip() not in info: info[k.strip()] = v.strip()
    except OSError: pass
    cpu = ' '.join(info.values()) or platform.processor() or platform.machine()
    return f'{cpu}; {torch.backends.cpu.get_cpu_capability()} kernels; torch {torch.__version__}'

def stored_on(nb_path:Path)->str|None:
    "The kind of machine whose outputs `nb_path` carries (`float_machine()` when they were stored), or None if unrecorded."
    f = Path(nb_path).parent/MACHINES
    return json.loads(f.read_text()).get(Path(nb_path).name) if f.exists() else None

def _record_machine(nb_path:Path):
    f = nb_path.parent/MACHINES
    machines = json.loads(f.read_text()) if f.exists() else {}
    machines[nb_path.name] = float_machine()
    tmp = f.with_suffix('.tmp'); tmp.write_text(json.dumps(dict(sorted(machines.items())), indent=1) + '\n')
    tmp.replace(f)   # whole or not at all

def store_outputs(nb_path:Path):
    "Run a notebook's default (non-slow) cells and write their outputs into it (the tutorials keep theirs), noting the machine."
    from execnb.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    nb_path = nb_path.resolve()
    os.environ.pop(SLOW_GATE, None)
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    nb = read_nb(nb_path)
    work, here = Path(tempfile.mkdtemp(prefix='peftlab-nb-')), os.getcwd()
    shutil.copytree(nb_path.parent, work/'nb')
    os.chdir(work/'nb')
    shell = CaptureShell(path=work/'nb')
    for cell in nb.cells:
        if cell.cell_type != 'code': continue
        if skipped(cell.source): continue
        shell.cell(cell)
        if shell.exc: raise RuntimeError(f'{nb_path.name}: a cell failed:\n{cell.source}') from shell.exc
    write_nb(nb, nb_path)
    _record_machine(nb_path)   # training runs round differently on another CPU: its numbers are only comparable on this kind
    os.chdir(here)
    shutil.rmtree(work, ignore_errors=True)

# ---------------------------------------------------------------------------------------------------------
# Rendering

_ansi = re.compile(r'\x1B(?:[@-Z\\-_]|\[[0-?]*[ -/]*[@-~])')

def clean_stream(text:str)->str:
    "Strip ANSI codes and keep only the last state of lines a progress bar rewrote with \\r."
    text = _ansi.sub('', text)
    return '\n'.join(l.rstrip('\r').split('\r')[-1] for l in text.split('\n'))

def slug(s:str)->str:
    s = re.sub(r'<[^>]+>', '', html.unescape(s)).strip().lower()
    return re.sub(r'[^\w.\- ]', '', s).replace(' ', '-')

def markdown(src:str)->str:
    from nbconvert.filters.markdown_mistune import markdown2html_mistune
    return markdown2html_mistune(src)

def _heading_ids(h:str, seen:set)->str:
    "Give every heading an id (its own, or its text slugged) that is unique in the page."
    def sub(m):
        attrs, inner = m.group(2), m.group(3)
        old = re.search(r'\sid="([^"]*)"', attrs)
        base = old.group(1) if old else (slug(re.sub(r'<a class="anchor-link".*?</a>', '', inner)) or 'section')
        i, n = base, 1
        while i in seen: n += 1; i = f'{base}-{n}'
        seen.add(i)
        attrs = re.sub(r'\sid="[^"]*"', '', attrs)
        if 'anchor-link' in inner: inner = re.sub(r'(<a class="anchor-link" href=")#[^"]*"', fr'\1#{i}"', inner)
        else: inner += f'<a class="anchor-link" href="#{i}">&#182;</a>'
        return f'<h{m.group(1)} id="{i}"{attrs}>{inner}</h{m.group(1)}>'
    return re.sub(r'<h([1-6])((?:\s[^>]*)?)>(.*?)</h\1>', sub, h, flags=re.S)

def _showdoc_md(md:str)->tuple:
    "show_doc's markdown without its rule and with its source link as plain markdown; and the symbol's name."
    md = re.sub(r'^\s*---\s*\n', '', md)
    link = ''
    m = re.search(r'\[source\]\(([^)]*)\)\{[^}]*\}\s*', md)
    if m:
        link = f'<a class="source-link" href="{html.escape(re.sub(r"#LNone$", "", m.group(1)))}">source</a>'
        md = md[:m.start()] + md[m.end():]
    name = re.search(r'^#+\s+(.+)$', md, re.M)
    return md, link, (name.group(1).strip() if name else '')

class Page:
    "One page of the site being rendered: its html body, images, anchors and the symbols it documents."
    def __init__(self, nb_path:Path|None, url:str, title:str, summary:str=''):
        self.nb_path, self.url, self.title, self.summary = nb_path, url, title, summary
        self.body, self.files, self.ids, self.symbols, self.toc = '', {}, set(), {}, []

    @property
    def root(self): return '../' * self.url.count('/')

def _title(cells:list)->tuple:
    "The notebook's `# Title` and `> summary` from its first markdown cell, and that cell's remaining text."
    for c in cells:
        if c['cell_type'] != 'markdown': continue
        src = _text(c['source'])
        m = re.match(r'\s*#\s+(.+?)\s*\n(?:\s*>\s*(.+?)\s*(?:\n|$))?', src + '\n')
        if not m: return None, '', None
        return m.group(1), (m.group(2) or ''), (c, src[m.end():])
    return None, '', None

def render_output(o:dict, page:Page, md_cls='tex2jax_process')->str:
    t = o.get('output_type')
    if t == 'stream':
        text = clean_stream(_text(o.get('text'))).strip('\n')
        if not text.strip(): return ''
        return f'<pre class="output {html.escape(o.get("name", "stdout"))}">{html.escape(text)}</pre>'
    if t == 'error':
        tb = clean_stream('\n'.join(o.get('traceback', [])))
        return f'<pre class="output error">{html.escape(tb or o.get("ename", "") + ": " + o.get("evalue", ""))}</pre>'
    data, meta = o.get('data', {}), o.get('metadata', {})
    for mime in ('image/png', 'image/jpeg'):
        if mime in data:
            name = f'{Path(page.url).stem}_files/figure-{len(page.files) + 1}.{mime.split("/")[1]}'
            page.files[name] = base64.b64decode(_text(data[mime]))
            size = meta.get(mime, {}) if isinstance(meta.get(mime), dict) else {}
            attrs = ''.join(f' {k}="{size[k]}"' for k in ('width', 'height') if k in size)
            alt = html.escape(_text(data.get('text/plain', 'figure')).strip()[:80])
            return f'<div class="output figure"><img src="{name.split("/", 1)[0]}/{name.split("/", 1)[1]}"{attrs} alt="{alt}"></div>'
    if 'image/svg+xml' in data: return f'<div class="output figure">{_text(data["image/svg+xml"])}</div>'
    if 'application/vnd.jupyter.widget-view+json' in data:
        note = ('<div class="output widget">An interactive widget: open this notebook in JupyterLab '
                '(<code>make lab</code>) to turn its knobs.</div>')
        return note + (f'<div class="output html">{_text(data["text/html"])}</div>' if 'text/html' in data else '')
    if 'text/html' in data: return f'<div class="output html">{_text(data["text/html"])}</div>'
    if 'text/markdown' in data: return f'<div class="output markdown {md_cls}">{markdown(_text(data["text/markdown"]))}</div>'
    if 'text/latex' in data: return f'<div class="output latex {md_cls}">{html.escape(_text(data["text/latex"]))}</div>'
    if 'text/plain' in data:
        return f'<pre class="output text">{html.escape(clean_stream(_text(data["text/plain"])))}</pre>'
    return ''

def _code(src:str)->str:
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import PythonLexer
    return highlight(src, PythonLexer(), HtmlFormatter(cssclass='highlight'))

def render_cells(cells:list, page:Page)->str:
    "The html of a notebook's cells, nbdev-style: hidden cells dropped, show_doc after the code it documents."
    parts, pending = [], []    # pending: exported source, shown after the show_doc cells that follow it
    def flush():
        parts.extend(pending); pending.clear()
    for c in cells:
        src = _text(c['source'])
        if c['cell_type'] == 'markdown':
            flush()
            if src.strip(): parts.append(f'<div class="cell markdown tex2jax_process">{markdown(src)}</div>')
            continue
        if c['cell_type'] != 'code': continue
        d, meta = directives(src), c.get('metadata', {})
        outs = c.get('outputs', [])
        if meta.get('showdoc'):
            for o in outs:
                md = _text(o.get('data', {}).get('text/markdown', ''))
                if not md: continue
                md, link, name = _showdoc_md(md)
                anchor = name.lower()
                page.symbols[name] = anchor
                h = markdown(md)
                h = re.sub(r'<h([1-6])[^>]*>', fr'<h\1 id="{html.escape(anchor)}" class="symbol">', h, count=1)
                parts.append(f'<div class="cell showdoc">{link}{h}</div>')
            continue
        flush()
        if 'hide' in d or d.get('include', '').lower() == 'false' or 'default_exp' in d: continue
        code = strip_directives(src)
        if not code and not outs: continue
        exported = bool({'export', 'exporti', 'exports'} & d.keys())
        html_outs = '' if d.get('output', '').lower() == 'false' else ''.join(render_output(o, page) for o in outs)
        if exported and 'exports' not in d:
            pending.append(f'<details class="cell code exported"><summary>exported source</summary>{_code(code)}{html_outs}</details>')
            continue
        flags = [f for f in ('slow', 'cuda') if f in d]
        badge = ''
        if flags:
            note = 'not run for this page' if meta.get('not_run') else 'run here with its recorded results'
            if meta.get('not_run') and outs: note = 'outputs recorded when it last ran'
            badge = f'<div class="badge">#| {" ".join(flags)} — {note}</div>'
        shown = '' if d.get('echo', '').lower() == 'false' else _code(code)
        parts.append(f'<div class="cell code{" flagged" if flags else ""}">{badge}{shown}{html_outs}</div>')
    flush()
    return '\n'.join(parts)

def render_notebook(nb_path:Path, nb:dict)->Page:
    cells = nb['cells']
    title, summary, first = _title(cells)
    page = Page(nb_path, page_of(nb_path), title or nb_path.stem, summary)
    if first: cells = [dict(c, source=first[1]) if c is first[0] else c for c in cells]
    seen = set()
    page.body = _heading_ids(render_cells(cells, page), seen)
    page.ids |= seen
    page.toc = [(m.group(1), re.sub(r'<[^>]+>', '', re.sub(r'<a class="anchor-link".*?</a>', '', m.group(2)))) for m in re.finditer(r'<h2 id="([^"]+)"[^>]*>(.*?)</h2>', page.body, re.S)]
    return page

# ---------------------------------------------------------------------------------------------------------
# Methods, links, the sidebar and the page frame

def module_pages(nbs:list)->dict:
    "Exported module -> page, from each notebook's `#| default_exp`."
    res = {}
    for p in nbs:
        for c in json.loads(p.read_text())['cells']:
            m = re.search(r'^\s*#\|\s*default_exp\s+(\S+)', _text(c['source']), re.M) if c['cell_type'] == 'code' else None
            if m: res[f'peftlab.{m.group(1)}'] = page_of(p); break
    return res

def method_pages(nbs:list, names:list)->dict:
    "Registered method -> the page of the notebook that registers it (its `register*(\"name\"` call)."
    res = {}
    for p in nbs:
        src = '\n'.join(_text(c['source']) for c in json.loads(p.read_text())['cells'] if c['cell_type'] == 'code')
        for n in names:
            if n not in res and re.search(r'register\w*\(\s*["\']' + re.escape(n) + r'["\']', src): res[n] = page_of(p)
    return res

def methods_page(all_nbs:list)->tuple:
    "The page of every registered method (`methods_markdown`), each name linked to its notebook."
    from peftlab.core.registry import methods_markdown, METHODS, discover
    discover()
    md = methods_markdown()
    names = re.findall(r'^\| `([^`]+)` \|', md, re.M)
    pages = method_pages(all_nbs, names)
    mods = module_pages(all_nbs)
    for n in names:
        if n not in pages and n in METHODS:
            m = METHODS[n]
            mod = getattr(m.apply, '__module__', None)
            pages[n] = mods.get(mod) or mods.get(m.config.__module__)
    md = re.sub(r'^\| `([^`]+)` \|', lambda m: f'| [`{m.group(1)}`]({pages[m.group(1)]}) |' if pages.get(m.group(1)) else m.group(0), md, flags=re.M)
    page = Page(None, 'methods.html', 'All methods', 'Every registered method, with its paper and the PEFT equivalent where there is one.')
    intro = ('<p>This table is <code>pl.methods()</code>: every method registers itself with its paper. '
             'Each name links to the notebook that explains, tests and tries it; apply any of them with '
             '<code>pl.apply(model, name, ...)</code>.</p>')
    page.body = intro + f'<div class="cell markdown methods">{markdown(md)}</div>'
    return page, pages

def linkify(page:Page, symbols:dict, methods:dict):
    "Link `name` in prose to the page that documents it (a show_doc'd symbol, or a registered method)."
    def sub(m):
        name = m.group(1)
        key = re.sub(r'^(pl|peftlab)\.', '', name).rstrip('()')
        target = symbols.get(key.lower()) or symbols.get(key.split('.')[-1].lower())
        if target is None and key in methods and methods[key]: target = methods[key]
        if target is None or target == f'{page.url}#{key.lower()}': return m.group(0)
        return f'<a href="{page.root}{target}"><code>{name}</code></a>'
    def in_prose(block):
        return re.sub(r'(?<!<a href=")<code>([A-Za-z_][\w.\-]*(?:\(\))?)</code>(?!</a>)', sub, block.group(0))
    page.body = re.sub(r'<div class="(?:cell markdown|output markdown)[^"]*">.*?</div>', in_prose, page.body, flags=re.S)

def notebook_links(page:Page, built:set|None=None):
    "Links to notebooks (`../adapters/00_lora.ipynb`, `nbs/core/06_train.ipynb#x`) point at their pages (unbuilt: text)."
    here = page.nb_path.parent if page.nb_path else NBS
    def sub(m):
        path, frag = m.group(3), m.group(4) or ''
        for base in (here, ROOT, NBS):
            nb = (base/path).resolve()
            if nb.is_file() and nb.is_relative_to(NBS):
                if built is not None and page_of(nb) not in built: return m.group(6)
                return f'{m.group(1)}"{page.root}{page_of(nb)}{frag}"{m.group(5)}{m.group(6)}</a>'
        return m.group(0)
    page.body = re.sub(r'(<a\s[^>]*?href=)"((?![a-z][a-z0-9+.-]*:)([^"#]+\.ipynb)(#[^"]*)?)"([^>]*>)(.*?)</a>', sub, page.body, flags=re.S)

def _sidebar(pages:list, current:Page, methods_url='methods.html')->str:
    r = current.root
    def li(p):
        cls = ' class="current"' if p is current else ''
        toc = ''
        if p is current and p.toc:
            toc = '<ul class="toc">' + ''.join(f'<li><a href="#{i}">{t}</a></li>' for i, t in p.toc) + '</ul>'
        return f'<li{cls}><a href="{r}{p.url}">{html.escape(p.title)}</a>{toc}</li>'
    home = next((p for p in pages if p.url == 'index.html'), None)
    meth = next((p for p in pages if p.url == methods_url), None)
    out = ['<nav class="sidebar" aria-label="Notebooks"><ul class="top">']
    if home: out.append(li(home))
    if meth: out.append(li(meth))
    out.append('</ul>')
    for part, label in PARTS:
        ps = [p for p in pages if p.url.startswith(part + '/')]
        if not ps: continue
        is_open = ' open' if current in ps else ''
        out.append(f'<details class="part"{is_open}><summary>{label}</summary><ul>{"".join(li(p) for p in ps)}</ul></details>')
    out.append('</nav>')
    return ''.join(out)

def frame(page:Page, pages:list, site_title:str)->str:
    from jinja2 import Template
    src = page.nb_path.relative_to(ROOT).as_posix() if page.nb_path else None
    return Template((ASSETS/'page.html').read_text()).render(
        page=page, root=page.root, sidebar=_sidebar(pages, page), site_title=site_title, source=src,
        summary_html=markdown(page.summary) if page.summary else '')

def copy_assets(out:Path):
    "The stylesheet, pygments' colours and MathJax, into out/assets."
    import importlib.util
    from pygments.formatters import HtmlFormatter
    a = out/'assets'
    a.mkdir(parents=True, exist_ok=True)
    shutil.copy(ASSETS/'style.css', a/'style.css')
    (a/'pygments.css').write_text(HtmlFormatter(style='friendly').get_style_defs('.highlight'))
    spec = importlib.util.find_spec('jupyter_server_mathjax')
    if spec is None: sys.exit('MathJax not found: install the dev extra (`pip install -e ".[dev]"`: jupyter-server-mathjax)')
    mj = Path(spec.submodule_search_locations[0])/'static'
    if not (a/'mathjax'/'MathJax.js').exists(): shutil.copytree(mj, a/'mathjax', dirs_exist_ok=True)

# ---------------------------------------------------------------------------------------------------------
# Checking the built site

class _Links(HTMLParser):
    def __init__(self):
        super().__init__(); self.links, self.ids = [], set()
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if 'id' in a: self.ids.add(a['id'])
        if tag == 'a' and a.get('name'): self.ids.add(a['name'])
        for k in ('href', 'src'):
            if a.get(k): self.links.append((tag, a[k]))

def check_site(out:Path)->list:
    "Problems with the site in `out`: relative links or images that do not resolve, anchors not on the page."
    out = Path(out)
    parsed = {}
    def parse(p):
        if p not in parsed:
            x = _Links(); x.feed(p.read_text()); parsed[p] = x
        return parsed[p]
    problems = [] if (out/'index.html').exists() else [f'{out}: no index.html']
    for page in sorted(out.rglob('*.html')):
        if 'assets' in page.relative_to(out).parts: continue
        for tag, link in parse(page).links:
            if re.match(r'^[a-z][a-z0-9+.-]*:', link, re.I) or link.startswith('//'): continue   # http:, mailto:, data:
            path, _, frag = link.partition('#')
            path = path.split('?')[0]
            target = (page.parent/path).resolve() if path else page
            where = f'{page.relative_to(out)}: <{tag}> {link}'
            if not target.exists(): problems.append(f'{where}: no such file'); continue
            if frag and target.suffix == '.html' and frag not in parse(target).ids:
                problems.append(f'{where}: no element with id {frag!r}')
    return problems

def site_errors(nbs:dict)->list:
    "Error outputs in the notebooks as the site shows them, as `notebook: cell n: error` lines."
    return [f"{p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}: cell {i}: {o.get('ename')}: {o.get('evalue')}"
            for p, nb in nbs.items() for i, c in enumerate(nb['cells'])
            for o in c.get('outputs', []) if o.get('output_type') == 'error']

# ---------------------------------------------------------------------------------------------------------

class Site:
    "A built site: where it is, its pages, the executed notebooks, and what is wrong with it."
    def __init__(self, out, pages, executed, errors, problems):
        self.out, self.pages, self.executed, self.errors, self.problems = out, pages, executed, errors, problems

def build(out:Path, paths=None, jobs:int=2, cache:Path|None=None, log=print)->Site:
    "Build the site for `paths` (default: every notebook) into `out`."
    t0 = time.time()
    out = Path(out)
    nbs = notebooks(paths)
    log(f'executing {len(nbs)} notebooks ({jobs} at a time)')
    executed = execute_all(nbs, cache or ROOT/'_proc'/'docs_cache', jobs, log)
    pages = [render_notebook(p, nb) for p, nb in executed.items()]
    pages.sort(key=lambda p: (p.url != 'index.html', [k for k, _ in PARTS].index(p.url.split('/')[0])
                              if p.url.split('/')[0] in dict(PARTS) else -1, p.nb_path.as_posix()))   # notebook order
    mpage, mpages = methods_page(notebooks())
    built = {p.url for p in pages}
    mpages = {k: v for k, v in mpages.items() if v in built}
    mpage.body = re.sub(r'<a href="([^"]+\.html)">(.*?)</a>', lambda m: m.group(0) if m.group(1) in built else m.group(2), mpage.body)
    pages.insert(1 if pages and pages[0].url == 'index.html' else 0, mpage)
    symbols = {}
    for p in pages:
        for name, anchor in p.symbols.items():
            symbols.setdefault(name.lower(), f'{p.url}#{anchor}')
    for p in pages: notebook_links(p, built); linkify(p, symbols, mpages)
    if out.exists():
        for old in out.rglob('*.html'): old.unlink()
    copy_assets(out)
    from peftlab import __version__
    for p in pages:
        dest = out/p.url
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(frame(p, pages, f'peftlab {__version__}'))
        for name, data in p.files.items():
            (dest.parent/name).parent.mkdir(parents=True, exist_ok=True)
            (dest.parent/name).write_bytes(data)
    (out/'.nojekyll').touch()
    log(f'{len(pages)} pages in {out} ({time.time() - t0:.0f}s)')
    return Site(out, pages, executed, site_errors(executed), check_site(out))

# ---------------------------------------------------------------------------------------------------------
# Reading the site as a reader does: headless Chromium

def find_chromium()->str|None:
    "Chromium's command, if it is installed (`make docs-browser` installs Debian's)."
    return next((shutil.which(n) for n in ('chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable')
                 if shutil.which(n)), None)

class serve:
    "Serve `folder` over http on the loopback interface, in a thread: `with serve(d) as url: ...`."
    def __init__(self, folder): self.folder = Path(folder)
    def __enter__(self):
        import functools, http.server, threading
        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *a): pass
        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Quiet, directory=str(self.folder)))
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return f'http://127.0.0.1:{self.httpd.server_address[1]}/'
    def __exit__(self, *a): self.httpd.shutdown(); self.httpd.server_close()

def _chromium(args:list, timeout=90)->str:
    exe = find_chromium()
    if not exe: raise FileNotFoundError('Chromium is not installed: run `make docs-browser`')
    cmd = [exe, '--headless', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--hide-scrollbars',
           '--no-first-run', '--mute-audio', '--virtual-time-budget=15000', *args]
    with tempfile.TemporaryDirectory() as prof:
        r = subprocess.run(cmd + [f'--user-data-dir={prof}'], capture_output=True, text=True, timeout=timeout)
    if r.returncode: raise RuntimeError(f'chromium failed ({r.returncode}): {r.stderr[-2000:]}')
    return r.stdout

def screenshot(url:str, png:Path, width=1280, height=1800)->Path:
    "A screenshot of the page at `url`, after its scripts (MathJax) ran."
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    _chromium([f'--window-size={width},{height}', f'--screenshot={png}', url])
    return Path(png)

def dump_dom(url:str)->str:
    "The page's DOM after its scripts ran (rendered math included)."
    return _chromium(['--dump-dom', url])

def screenshots(out:Path, dest:Path, urls=('index.html', 'tutorials/lowrank_family.html', 'adapters/lora.html', 'methods.html'))->list:
    "Screenshots of a few pages of the site in `out` (those that exist), into `dest`."
    res = []
    with serve(out) as base:
        for u in urls:
            if (Path(out)/u).exists(): res.append(screenshot(base + u, Path(dest)/(u.replace('/', '_')[:-5] + '.png')))
    return res

def take_screenshots(out:Path, dest:Path):
    if not find_chromium(): sys.exit('no screenshots: Chromium is not installed (run `make docs-browser`)')
    for p in screenshots(out, dest): print(f'screenshot: {p}')

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('notebooks', nargs='*', help='notebooks to build (default: all of nbs/)')
    ap.add_argument('--out', default=str(ROOT/'_docs'))
    ap.add_argument('--jobs', type=int, default=2)
    ap.add_argument('--cache', default=str(ROOT/'_proc'/'docs_cache'))
    ap.add_argument('--screenshots', metavar='DIR', help='also take screenshots of the front page and a tutorial into DIR')
    ap.add_argument('--check', metavar='SITE', help='only check the links of a built site')
    ap.add_argument('--store-outputs', action='store_true', help='run the given notebooks and write their outputs into them')
    ap.add_argument('--execute-one', nargs=3, metavar=('SRC', 'DEST', 'WORKDIR'), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.execute_one: return execute_one(*map(Path, a.execute_one))
    if a.check:
        problems = check_site(Path(a.check))
        if problems: sys.exit('\n'.join(problems))
        print(f'{a.check}: every link resolves')
        if a.screenshots: take_screenshots(Path(a.check), Path(a.screenshots))
        return
    if a.store_outputs:
        for p in a.notebooks: store_outputs(Path(p)); print(f'stored outputs in {p}')
        return
    site = build(Path(a.out), a.notebooks or None, a.jobs, Path(a.cache))
    if site.errors or site.problems: sys.exit('the site has problems:\n' + '\n'.join(site.errors + site.problems))
    if a.screenshots: take_screenshots(site.out, Path(a.screenshots))

if __name__ == '__main__': main()
