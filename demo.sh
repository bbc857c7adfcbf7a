#!/usr/bin/env bash
# The embedded default, end to end on a CPU, in the paper's order: install; generate EgoWorld v2; from the
# committed base (assets/egoworld_v2_base: the tiny Qwen2-VL that learned to caption the train videos and read,
# the nano analog of a pretrained VLM), the reverse-thinking CoT cold start on 250 videos, then GRPO on the other
# 3,750 videos' answer letters (ST-R1). Each is benched on the test split's MCQs, paired (McNemar) with the row it
# starts from; table, chart and curves.
#     bash demo.sh                  # ~8 minutes on 2 cores (README: the measured stage times)
#     BASE=train bash demo.sh       # the base trained here first, from a random tiny model (+~9 minutes)
#     QUICK=1 bash demo.sh          # the same code path in ~1 minute (what CI runs as a test)
#     FAMILY=qwen2_5_vl bash demo.sh   # on a tiny Qwen2.5-VL (or qwen3_vl), its base trained first
#     FULL=1 bash demo.sh           # the paper's table at nano scale (issue 25), its base trained first: two GRPO
#                                   # seeds, forward-only and SFT controls, ood columns, two jobs at a time
# DATA / OUT choose where data and checkpoints go; SETUP=0 skips the pip install.
# Every stage is a plain command (printed before it runs), so any of them can be re-run alone. EgoWorld v1, the
# demo before issue 25, is config/sft_egoworld.py then config/grpo_egoworld.py on `egoworld.py`'s defaults.
set -euo pipefail
cd "$(dirname "$0")"
DATA=${DATA:-data_egoworld_v2}
[ "${FULL:-0}" = 1 ] && OUT=${OUT:-out_v2} || OUT=${OUT:-out}
PY=${PYTHON:-python3}
W="--version=2 --cot_caption=True --cot_judged=True"
if [ "${QUICK:-0}" = 1 ]; then  # tiny sizes, same code: a smoke test of the whole pipeline
  GEN="--n_train=8 --n_test=2 --n_ood=2 --n_ood_theme=2 --cold_start=4"
  MODEL="--tiny_corpus=200"
  SFT="--max_steps=4 --token_budget=2048"
  GRPO="--max_steps=2 --prompts_per_step=2 --num_generations=2 --max_completion_length=24 --save_interval=0"
  BENCH="--max_new_tokens=24"
else
  GEN="--n_train=4000 --cold_start=250"; MODEL=""; SFT=""; GRPO=""; BENCH=""
fi
# the base: the committed one, unless asked to train it or the family has none committed (Qwen2-VL only)
BASE=${BASE:-assets/egoworld_v2_base}
if [ "${FULL:-0}" = 1 ] || [ "${FAMILY:-qwen2_vl}" != qwen2_vl ]; then BASE=train; fi
# Qwen3-VL's 16-pixel patches: the 56-pixel frames resized to 64, the same 2 x 2 merged tokens a frame group
[ "${FAMILY:-qwen2_vl}" = qwen3_vl ] && PIX="--min_pixels=4096 --max_pixels=4096" || PIX=""
# what the stages share: train data, the SFT preset, bench outputs; bench ($b CKPT $q), GRPO ($G), cold start ($C)
T="$DATA/train"; R="config/sft_egoworld.py"; B="$OUT/bench"
b="$PY bench.py"; q="config/bench_egoworld.py --tasks=direction,landmark,action --num_workers=0 $PIX $BENCH"
G="$PY grpo.py config/grpo_egoworld.py config/grpo_egoworld_v2.py --data=$T/rl_mcq.jsonl $PIX $GRPO"
BASE_DIR=$BASE; [ "$BASE" = train ] && BASE_DIR=$OUT/read   # the model every cold start starts from
C="$PY sft.py $R config/sft_egoworld_v2.py --init_from=$BASE_DIR $PIX $SFT"
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
fail() { echo "[demo] a job failed: its log is in $OUT/logs"; kill $(jobs -p) 2>/dev/null; exit 1; }
jobs2() {  # jobs2 DIR NAME 'CMD' ...: done_or stages, two one-thread jobs at a time (the 2 cores), all awaited
  local n=0
  mkdir -p "$OUT/logs"
  while [ $# -gt 0 ]; do
    echo "[demo] $2: $3   (log: $OUT/logs/$2.log)"
    ( export OMP_NUM_THREADS=1; done_or "$1" "$2" bash -c "$3" ) > "$OUT/logs/$2.log" 2>&1 &
    shift 3; n=$((n + 1))
    if [ $n = 2 ]; then wait -n || fail; n=1; fi
  done
  while [ $n -gt 0 ]; do wait -n || fail; n=$((n - 1)); done
}
train_base() {  # the base ("pretrained") stage, from a random tiny model: captions, then the reading drill
  [ -f "$OUT/tiny/config.json" ] || stage model $PY egoworld.py --make_model="$OUT/tiny" $W \
    --family="${FAMILY:-qwen2_vl}" $MODEL
  done_or "$OUT/base" base $PY sft.py $R config/sft_egoworld_v2_base.py --init_from="$OUT/tiny" \
    --data="$T/captions.jsonl,$T/captions.jsonl,$T/reading.jsonl" --out_dir="$OUT/base" $PIX $SFT
  done_or "$OUT/read" read $PY sft.py $R config/sft_egoworld_v2_read.py --init_from="$OUT/base" \
    --data="$T/reading.jsonl" --out_dir="$OUT/read" $PIX $SFT
}
full() {  # FULL=1: each row of the paper's table at nano scale, then the table (.md, .csv, .png)
  local ACC="--reward_weights={'accuracy':1.0,'format':0.5,'reverse':0.0,'route':1.0}"
  # the SFT controls: the cold start continued for GRPO's time (400 steps ~ 80 GRPO steps, one thread each)
  local MORE="--max_steps=400 --lr=3e-4 --min_lr=1e-4 --warmup_frac=0 --seed=2 --save_interval=0 $PIX"
  jobs2 "$OUT/cold" cold "$C --data=$T/cold_start.jsonl --out_dir=$OUT/cold" \
        "$OUT/cold_fwd" cold_fwd "$C --data=$T/cold_start_forward.jsonl --out_dir=$OUT/cold_fwd"
  local names=(base CoT-SFT "+GRPO acc+fmt s1" "+GRPO acc+fmt s2" "ST-R1 s1" "ST-R1 s2" fwd-CoT-SFT
                       "fwd +GRPO" "CoT-SFT more" "answer SFT")
  local rows=(base cold acc1 acc2 rev1 rev2 cold_fwd fwd sft_more sft_ans)
  local from=(- base cold cold cold cold cold cold_fwd cold cold)
  local jobs=() i s
  for i in 0 1 6; do for s in test ood ood_theme; do   # the rows every other row starts from, benched first
    jobs+=("$B/${rows[i]}_$s" "bench_${rows[i]}_$s" "$b $OUT/${rows[i]} $q --data=$DATA/$s --out_dir=$B/${rows[i]}_$s")
  done; done
  jobs+=("$OUT/rev1" rev1 "$G --init_from=$OUT/cold --seed=1 --out_dir=$OUT/rev1"
         "$OUT/rev2" rev2 "$G --init_from=$OUT/cold --seed=2 --out_dir=$OUT/rev2"
         "$OUT/acc1" acc1 "$G --init_from=$OUT/cold --seed=1 --out_dir=$OUT/acc1 \"$ACC\""
         "$OUT/acc2" acc2 "$G --init_from=$OUT/cold --seed=2 --out_dir=$OUT/acc2 \"$ACC\""
         "$OUT/fwd" fwd "$G --init_from=$OUT/cold_fwd --seed=1 --out_dir=$OUT/fwd \"$ACC\""
         "$OUT/sft_more" sft_more "$PY sft.py $R --init_from=$OUT/cold --data=$T/cold_start.jsonl $MORE \
           --out_dir=$OUT/sft_more $SFT"
         "$OUT/sft_ans" sft_ans "$PY sft.py $R --init_from=$OUT/cold --data=$T/rl_mcq.jsonl $MORE \
           --out_dir=$OUT/sft_ans $SFT")
  jobs2 "${jobs[@]}"
  jobs=()
  for i in 2 3 4 5 7 8 9; do for s in test ood ood_theme; do
    local r=${rows[i]} pair=""; [ $s = test ] && pair="--paired_with=$B/${from[i]}_test"
    jobs+=("$B/${r}_$s" "bench_${r}_$s" "$b $OUT/$r $q --data=$DATA/$s --out_dir=$B/${r}_$s $pair")
  done; done
  jobs2 "${jobs[@]}"
  local names_csv; names_csv=$(IFS=,; echo "${names[*]}")
  stage table $PY leaderboard.py $(for r in "${rows[@]}"; do echo "$B/${r}_test"; done) --names="$names_csv" \
    --splits=ood,ood_theme --pairs=2:1,5:9,6:9,5:10,6:10,5:3,6:4,7:2,5:8 --out="$OUT/table_v2"
  stage curves $PY curves.py $OUT/rev1 $OUT/acc1 $OUT/fwd --names=ST-R1,acc+fmt,fwd --out="$OUT/curves_grpo.png"
  echo "total $(( $(date +%s) - T0 ))s" | tee -a "$OUT/demo_times.txt"
  echo; cat "$OUT/table_v2.md"
  echo; echo "table: $OUT/table_v2.{md,csv,png}; GRPO curves: $OUT/curves_grpo.png; times: $OUT/demo_times.txt"
}
T0=$(date +%s)
[ "${SETUP:-1}" = 0 ] || stage setup $PY -m pip install -q -r requirements.txt
[ -f "$DATA/test/routes.jsonl" ] || stage data $PY egoworld.py --out="$DATA" $W $GEN
[ "$BASE" = train ] && train_base
if [ "${FULL:-0}" = 1 ]; then full; exit 0; fi
done_or "$OUT/cold" cold $C --data="$T/cold_start.jsonl" --out_dir="$OUT/cold"
stage bench_base $b "$BASE_DIR" $q --data="$DATA/test" --out_dir="$B/base_test"
stage bench_cold $b "$OUT/cold" $q --data="$DATA/test" --out_dir="$B/cold_test" --paired_with="$B/base_test"
done_or "$OUT/grpo" grpo $G --init_from="$OUT/cold" --out_dir="$OUT/grpo"
stage bench_grpo $b "$OUT/grpo" $q --data="$DATA/test" --out_dir="$B/grpo_test" --paired_with="$B/cold_test"
stage table $PY leaderboard.py "$B/base_test" "$B/cold_test" "$B/grpo_test" --names=base,CoT-SFT,ST-R1 \
  --out="$OUT/table"
curves() {
  $PY curves.py "$OUT/cold" --out="$OUT/curves_sft.png"
  $PY curves.py "$OUT/grpo" --out="$OUT/curves_grpo.png"
}
stage curves curves
echo "total $(( $(date +%s) - T0 ))s" | tee -a "$OUT/demo_times.txt"
echo; echo "== EgoWorld v2, test split MCQ (chance = 25%): base -> CoT cold start -> ST-R1, each paired with the row" \
  "before it =="
cat "$OUT/table.md"
echo; echo "table: $OUT/table.{md,csv,png}; training curves: $OUT/curves_sft.png $OUT/curves_grpo.png;" \
  "stage times: $OUT/demo_times.txt"
echo "the paper's whole table, with the SFT controls: FULL=1 bash demo.sh (README)"
