#!/usr/bin/env bash
# benchmarks/gpu_check.py on a machine without internet: the packages that do not import are installed from the
# wheels carried in .whl/ (how they get there: gpu_check.py's docstring), then every check runs (one JSON line
# each; exit 1 if any failed). Arguments go to gpu_check.py, e.g. --checks=attention,decode
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for pair in numpy:numpy safetensors:safetensors transformers:transformers tokenizers:tokenizers decord:decord \
            PIL:pillow tqdm:tqdm; do
  python3 -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair#*:}")
done
if ((${#missing[@]})); then
  echo "gpu_check.sh: installing from .whl: ${missing[*]}" >&2
  python3 -m pip install -q --no-index --find-links .whl "${missing[@]}"
fi
exec python3 benchmarks/gpu_check.py "$@"
