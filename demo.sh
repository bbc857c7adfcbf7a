#!/usr/bin/env bash
# The embedded default, end to end on a CPU: install, generate EgoWorld, make the tiny Qwen2-VL, SFT with
# reverse-thinking CoT -> Ego-ST bench of the SFT checkpoint -> GRPO -> bench of the GRPO checkpoint, paired
# with the SFT one (McNemar), tables and curves.
#     bash demo.sh                  # ~15 minutes on 2 cores (README: the measured stage times)
#     QUICK=1 bash demo.sh          # the same code path in ~1 minute (what CI runs as a test)
#     FAMILY=qwen2_5_vl bash demo.sh   # the same on a tiny Qwen2.5-VL (default: qwen2_vl; or qwen3_vl)
# DATA / OUT choose where data and checkpoints go; SETUP=0 skips the pip install.
# Every stage is a plain command (printed before it runs), so any of them can be re-run alone.
set -euo pipefail
cd "$(dirname "$0")"
DATA=${DATA:-data_egoworld}
OUT=${OUT:-out}
PY=${PYTHON:-python3}
if [ "${QUICK:-0}" = 1 ]; then  # tiny sizes, same code: a smoke test of the whole pipeline
  GEN="--n_train=8 --n_test=2 --n_ood=2 --n_ood_theme=2"
  MODEL="--tiny_corpus=200"
  SFT="--max_steps=4 --token_budget=2048"
  GRPO="--max_steps=2 --prompts_per_step=2 --num_generations=2 --max_completion_length=24 --save_interval=0"
  BENCH="--max_new_tokens=24"
else
  GEN=""; MODEL=""; SFT=""; GRPO=""; BENCH=""
fi
# Qwen3-VL's 16-pixel patches: the 56-pixel frames resized to 64, the same 2 x 2 merged tokens a frame group
[ "${FAMILY:-qwen2_vl}" = qwen3_vl ] && PIX="--min_pixels=4096 --max_pixels=4096" || PIX=""
mkdir -p "$OUT"
: > "$OUT/demo_times.txt"
stage() {  # stage NAME CMD...: run, time, log
  local name=$1; shift
  echo "[demo] $name: $*"
  local t0=$(date +%s)
  "$@"
  echo "$name $(( $(date +%s) - t0 ))s" | tee -a "$OUT/demo_times.txt"
}
done_or() {  # done_or DIR NAME CMD...: run a training stage once; a finished one is kept (delete DIR to redo)
  local dir=$1; shift
  if [ -f "$dir/.demo_done" ]; then echo "[demo] $1: done before, kept ($dir)"; return; fi
  stage "$@"
  touch "$dir/.demo_done"
}
T0=$(date +%s)
[ "${SETUP:-1}" = 0 ] || stage setup $PY -m pip install -q -r requirements.txt
[ -f "$DATA/test/routes.jsonl" ] || stage data $PY egoworld.py --out="$DATA" $GEN
[ -f "$OUT/egoworld-tiny/config.json" ] || stage model $PY egoworld.py --make_model="$OUT/egoworld-tiny" \
  --family="${FAMILY:-qwen2_vl}" $MODEL
done_or "$OUT/sft-egoworld" sft $PY sft.py config/sft_egoworld.py --init_from="$OUT/egoworld-tiny" \
  --data="$DATA/train/st_r1_cot.jsonl" --out_dir="$OUT/sft-egoworld" $SFT $PIX
stage bench_sft $PY bench.py "$OUT/sft-egoworld" config/bench_egoworld.py --data="$DATA/test" \
  --out_dir="$OUT/bench/sft-egoworld_test" $BENCH $PIX
done_or "$OUT/grpo-egoworld" grpo $PY grpo.py config/grpo_egoworld.py --init_from="$OUT/sft-egoworld" \
  --data="$DATA/train/st_r1_cot.jsonl" --out_dir="$OUT/grpo-egoworld" $GRPO $PIX
stage bench_grpo $PY bench.py "$OUT/grpo-egoworld" config/bench_egoworld.py --data="$DATA/test" \
  --out_dir="$OUT/bench/grpo-egoworld_test" --paired_with="$OUT/bench/sft-egoworld_test" $BENCH $PIX
curves() {
  $PY curves.py "$OUT/sft-egoworld" --out="$OUT/curves_sft.png"
  $PY curves.py "$OUT/grpo-egoworld" --out="$OUT/curves_grpo.png"
}
stage curves curves
echo "total $(( $(date +%s) - T0 ))s" | tee -a "$OUT/demo_times.txt"
echo; echo "== SFT(CoT) on EgoWorld: test split (chance on MCQ = 25%) =="; cat "$OUT/bench/sft-egoworld_test/results.md"
echo; echo "== SFT(CoT) + GRPO: test split, paired with the SFT checkpoint =="
cat "$OUT/bench/grpo-egoworld_test/results.md"
echo; echo "training curves: $OUT/curves_sft.png $OUT/curves_grpo.png; stage times: $OUT/demo_times.txt"
echo "out of distribution: python bench.py $OUT/grpo-egoworld config/bench_egoworld.py --data=$DATA/ood_theme (README)"
