"""The documentation site (`make docs`, tools/docs.py), built for a few notebooks and read as a reader would:
links resolve, plots have images, no cell failed, show_doc and the table of methods are there, and headless
Chromium renders the pages (sidebar, figures, typeset math)."""
import importlib.util, json, re, shutil, subprocess, time
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location('peftlab_docs', ROOT/'tools'/'docs.py')
docs = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(docs)

# the front page, a small core notebook (show_doc of the registry), a method notebook with math and a plot
NOTEBOOKS = ['nbs/index.ipynb', 'nbs/core/03_registry.ipynb', 'nbs/adapters/25_oft.ipynb']
PLOT = re.compile(r'\.plot\(|plt\.|imshow\(|\.hist\(')

@pytest.fixture(scope='module')
def site():
    tmp = ROOT/'_proc'/'docs_test'        # kept after the run: the site and the screenshots, to look at
    shutil.rmtree(tmp, ignore_errors=True)
    t = time.time()
    s = docs.build(tmp/'_docs', [ROOT/p for p in NOTEBOOKS], jobs=2, cache=ROOT/'_proc'/'docs_cache', log=lambda *a: None)
    s.seconds = time.time() - t
    return s

def page(site, url): return (site.out/url).read_text()

def test_pages(site):
    urls = {p.url for p in site.pages}
    assert {'index.html', 'methods.html', 'core/registry.html', 'adapters/oft.html'} <= urls, urls
    assert (site.out/'assets'/'mathjax'/'MathJax.js').exists()
    side = re.search(r'<nav class="sidebar".*?</nav>', page(site, 'core/registry.html'), re.S).group(0)
    assert '<summary>Core</summary>' in side and '<summary>Adapters</summary>' in side
    assert 'Optimisers' not in side                      # only the parts that have pages
    assert 'href="../adapters/oft.html"' in side and 'href="../index.html"' in side

def test_links_resolve(site, tmp_path):
    assert site.problems == []
    assert docs.check_site(site.out) == []
    broken = tmp_path/'broken'                          # and the check does catch a broken link and anchor
    shutil.copytree(site.out, broken, ignore=shutil.ignore_patterns('mathjax'))
    p = broken/'index.html'
    p.write_text(p.read_text().replace('</main>', '<a href="core/nope.html">x</a><a href="methods.html#nope">y</a></main>'))
    problems = docs.check_site(broken)
    assert any('core/nope.html' in x for x in problems) and any("'nope'" in x for x in problems), problems

def test_no_error_outputs(site):
    assert site.errors == []
    for p in site.pages: assert 'class="output error"' not in page(site, p.url), p.url

def test_plot_cells_have_images(site):
    n_plots = 0
    for path, nb in site.executed.items():
        html = page(site, docs.page_of(path))
        for c in nb['cells']:
            src = ''.join(c['source'])
            d = docs.directives(src)    # slow cells draw only when they do their long work (PEFTLAB_SLOW=1)
            if c['cell_type'] != 'code' or not PLOT.search(src) or 'hide' in d or docs.SKIP_FLAGS & d.keys(): continue
            n_plots += 1
            assert any('image/png' in o.get('data', {}) for o in c.get('outputs', [])), f'{path.name}: no figure from\n{src}'
        imgs = re.findall(r'<img src="([^"]+)"', html)
        for i in imgs: assert (site.out/docs.page_of(path)).parent.joinpath(i).stat().st_size > 1000
    assert n_plots >= 1
    assert re.search(r'<img src="oft_files/figure-\d+\.png"', page(site, 'adapters/oft.html'))

def test_show_doc(site):
    from peftlab.core.registry import register, methods_markdown
    html = page(site, 'core/registry.html')
    block = re.search(r'<div class="cell showdoc">.*?<h\d id="register" class="symbol">.*?</div>\s*</div>', html, re.S)
    assert block, 'no show_doc for register'
    assert 'register' in block.group(0) and 'category' in block.group(0)        # the signature
    assert register.__doc__.split('`')[0].strip() in block.group(0)            # the docstring
    assert '<details class="cell code exported">' in html                     # the exported source, folded
    assert 'from fastcore.test import' not in html                           # `#| hide` cells are not shown

def test_names_in_prose_link_to_their_docs():
    p = docs.Page(None, 'adapters/x.html', 'X')
    p.body = ('<div class="cell markdown tex2jax_process"><p>Use <code>pl.apply</code>, <code>lora</code> and '
              '<code>nothing</code>.</p></div><div class="cell code"><pre><code>apply</code></pre></div>')
    docs.linkify(p, {'apply': 'core/registry.html#apply'}, {'lora': 'adapters/lora.html'})
    assert '<a href="../core/registry.html#apply"><code>pl.apply</code></a>' in p.body
    assert '<a href="../adapters/lora.html"><code>lora</code></a>' in p.body
    assert '<code>nothing</code>.' in p.body and '<pre><code>apply</code></pre>' in p.body   # unknown names, code: as they were

def test_methods_page(site):
    from peftlab.core.registry import methods
    html = page(site, 'methods.html')
    for name in methods().name: assert f'<code>{name}</code>' in html, name
    assert '<a href="adapters/oft.html"><code>oft</code></a>' in html     # linked to its notebook
    assert '<a href="adapters/lora.html">' not in html                         # not built here: not linked
    pages = docs.method_pages(docs.notebooks(), list(methods().name))
    assert pages['lora'] == 'adapters/lora.html' and pages['pissa'] == 'init/pissa.html'

def test_math_marked_for_mathjax(site):
    html = page(site, 'adapters/oft.html')
    assert re.search(r'<div class="cell markdown tex2jax_process">[^<]*<p>[^$]*\$[^$]+\$', html)
    assert '<body class="tex2jax_ignore">' in html                           # outputs and code are left alone

# ---------------------------------------------------------------------------------------------------------
# headless Chromium

@pytest.fixture(scope='module')
def chromium():
    if not docs.find_chromium():
        r = subprocess.run(['make', '-s', 'docs-browser'], cwd=ROOT, capture_output=True, text=True)
        if not docs.find_chromium():
            pytest.skip('Chromium is not installed and `make docs-browser` could not install it '
                        f'(it needs Debian\'s apt-get as root): {(r.stderr or r.stdout)[-300:]}')
    return docs.find_chromium()

@pytest.fixture(scope='module')
def rendered(site, chromium):
    shots = site.out.parent/'screenshots'
    res = {}
    with docs.serve(site.out) as base:
        for url in ('index.html', 'adapters/oft.html'):
            res[url] = (docs.dump_dom(base + url), docs.screenshot(base + url, shots/(url.replace('/', '_')[:-5] + '.png')))
    print('screenshots:', *(p for _, p in res.values()))
    return res

def _not_blank(png):
    import matplotlib.image as mpimg
    a = mpimg.imread(png)
    return a.shape[0] > 500 and a.shape[1] > 1000 and a[..., :3].std() > 0.05

def test_front_page_renders(rendered):
    dom, png = rendered['index.html']
    assert re.search(r'<title>peftlab – peftlab</title>', dom)
    side = re.search(r'<nav class="sidebar".*?</nav>', dom, re.S).group(0)
    assert len(re.findall(r'<a href=', side)) >= 4
    assert '<h1 class="title">peftlab</h1>' in dom
    assert _not_blank(png)

def test_notebook_page_renders(rendered):
    dom, png = rendered['adapters/oft.html']
    assert '<title>OFT – peftlab</title>' in dom
    assert re.search(r'<li class="current"><a href="../adapters/oft.html">OFT</a>', dom)
    assert re.search(r'<img src="oft_files/figure-\d+\.png"', dom)
    typeset = re.findall(r'class="MathJax(?:_Display)?"', dom)                  # MathJax ran and typeset the math
    assert len(typeset) >= 5, 'math was not typeset'
    err = re.search(r'class="[^"]*(?:merror|MathJax_Error)[^"]*"', dom)
    assert not err, f'MathJax could not typeset some TeX: ...{dom[max(0, err.start() - 300):err.end() + 300]}...'
    assert not re.search(r'<p>[^<]*\$[A-Za-z\\][^$<]*\$', dom)                 # no raw $...$ left in prose
    assert _not_blank(png)

def test_links_to_notebooks_point_at_their_pages():
    p = docs.Page(docs.ROOT/'nbs'/'core'/'06_train.ipynb', 'core/train.html', 'Training')
    p.body = ('<a href="13_distributed.ipynb">a</a> <a href="../adapters/00_lora.ipynb#merging">b</a> '
              '<a href="nbs/init/00_pissa.ipynb">c</a> <a href="https://x.org/y.ipynb">d</a> <a href="nope.ipynb">e</a>')
    docs.notebook_links(p)
    assert '<a href="../core/distributed.html">a</a>' in p.body and '<a href="../adapters/lora.html#merging">b</a>' in p.body
    assert '<a href="../init/pissa.html">c</a>' in p.body and 'href="https://x.org/y.ipynb"' in p.body
    assert 'href="nope.ipynb"' in p.body      # no such notebook: left for the link check to report

def test_links_to_notebooks_not_built_become_text():
    p = docs.Page(docs.ROOT/'nbs'/'index.ipynb', 'index.html', 'peftlab')
    p.body = '<a href="adapters/00_lora.ipynb">LoRA</a>, <a href="core/03_registry.ipynb">the registry</a>'
    docs.notebook_links(p, built={'index.html', 'core/registry.html'})
    assert p.body == 'LoRA, <a href="core/registry.html">the registry</a>'
