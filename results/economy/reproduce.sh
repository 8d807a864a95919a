#!/usr/bin/env bash
# Reproduce the tool-economy results (issue #12) from a fresh clone, on CPU, in one command:
#
#     bash results/economy/reproduce.sh [OUT]        # OUT defaults to outputs/economy; ~4 h on 2 cores (fp32)
#
# Phases, each skipped when its output already exists (so a killed run resumes where it stopped):
#   1. cold start      714 SFT traces (156 direct, 415 one-search, 143 two-search; every search thought
#                      recalls and gives up at the fact, continent recalls end "So its continent is ..."
#                      on both branches), one epoch of SFT (90 steps, ~50 min fp32), its knowledge check
#   2. baseline        the always-search policy: 714 search traces (558 one-search, 156 two-search,
#                      generic thoughts), the same number of SFT steps as phase 1 (~50 min)
#   3. GRPO            configs/grpo_economy.yaml from the phase-1 adapter: run CC-H, 30 updates (~75 min)
#   4. publish         the cold-start and GRPO adapters in bf16, as under results/ (seconds)
#   5. evaluation      every policy (the bf16 ones as published), greedy, on the balanced test set, the
#                      whole test split and the out-of-domain probe (~1, 5 and 3 min each), then one
#                      table and one EM-vs-calls Pareto plot per question set
# Everything is written under OUT; nothing in results/ is touched (compare OUT with results/economy/summary).
# Seeds: the published run is seed 0 (configs/grpo_economy.yaml); `SEED=1 bash results/economy/reproduce.sh`
# trains and evaluates another draw of phase 3 (README.md here: how far draws differ).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${1:-outputs/economy}
SEED=${SEED:-0}
Q=results/questions
mkdir -p "$OUT/logs"

run() {  # run NAME CMD...: the command's output goes to OUT/logs/NAME.log
    local name=$1; shift
    echo "[$(date +%H:%M:%S)] $name"
    "$@" > "$OUT/logs/$name.log" 2>&1 || { echo "failed: see $OUT/logs/$name.log"; exit 1; }
}

sft() {  # sft NAME N TRACE-OPTIONS...: N traces, then one epoch of SFT on them exported to OUT/NAME
    local name=$1 n=$2; shift 2
    [ -f "$OUT/$name/adapter_config.json" ] && return
    run "traces_$name" "$PY" -m data.traces --out "$OUT/traces_$name.jsonl" --n "$n" "$@"
    run "$name" "$PY" -m grpo fit -c configs/sft_smollm2.yaml --trainer.max_epochs 1 --trainer.limit_val_batches 0 \
        --data.traces "$OUT/traces_$name.jsonl" --data.num_traces "$n" --trainer.callbacks.dirpath "$OUT/$name" \
        --trainer.logger.init_args.save_dir "$OUT/runs" --trainer.logger.init_args.name "$name"
}

eval_json() {  # eval_json LABEL QUESTIONS: where `evaluate` writes its report
    echo "$OUT/runs/eval_$1_$2/version_0/report/eval.json"
}

evaluate() {  # evaluate LABEL ADAPTER QUESTIONS
    local name="eval_$1_$3"
    [ -f "$(eval_json "$1" "$3")" ] && return
    run "$name" "$PY" -m grpo validate -c configs/grpo_economy.yaml --model.init_adapter "$2" \
        --data.val_path "$Q/$3.jsonl" --data.batch_size 8 --trainer.logger.init_args.save_dir "$OUT/runs" \
        --trainer.logger.init_args.name "$name" --trainer.logger.init_args.version 0
}

# 1. cold start, and how much of the base model's knowledge it kept
sft sft_cc_714 714 --mix 0.3 0.5 0.2 --unknown-thought hedge-all --recall-search --continent-check
[ -f "$OUT/cold_start_eval.json" ] || run cold_start_eval "$PY" -m experiments.eval_cold_start \
    --adapter "$OUT/sft_cc_714" --split heldout --lookup-limit 64 --modes greedy sampled \
    --temperature 0.7 --samples 4 --out "$OUT/cold_start_eval.json"

# 2. always-search baseline: one- and two-search traces only, generic thoughts, as many as phase 1's traces
sft sft_always_both_714 714 --mix 0 0.5 0.2 --unknown-thought plain

# 3. GRPO from the cold start (run CC-H; a killed run is started again from its beginning)
GRPO_DIR="$OUT/runs/grpo_economy_seed$SEED/version_0/checkpoints"
if [ ! -d "$GRPO_DIR/last.adapter" ]; then
    run grpo_seed$SEED "$PY" -m grpo fit -c configs/grpo_economy.yaml --model.init_adapter "$OUT/sft_cc_714" \
        --seed_everything "$SEED" --model.seed "$SEED" --data.seed "$SEED" \
        --trainer.logger.init_args.save_dir "$OUT/runs" --trainer.logger.init_args.name grpo_economy_seed$SEED \
        --trainer.logger.init_args.version 0
fi

# 4. the adapters as published under results/ (bf16)
run publish_cold_start "$PY" -m callbacks.export "$OUT/sft_cc_714" "$OUT/sft_adapter_cc_714"
run publish_grpo "$PY" -m callbacks.export "$GRPO_DIR/last.adapter" "$OUT/grpo_adapter_seed$SEED"

# 5. evaluation of every policy on each question set, then the tables
for questions in test_balanced test_full probe_general_labelled; do
    evaluate cold_start "$OUT/sft_adapter_cc_714" $questions
    evaluate always_search "$OUT/sft_always_both_714" $questions
    evaluate grpo_seed$SEED "$OUT/grpo_adapter_seed$SEED" $questions
    run "compare_$questions" "$PY" -m callbacks.compare --out "$OUT/$questions" --baseline "always search" \
        "always search=$(eval_json always_search $questions)" "cold start=$(eval_json cold_start $questions)" \
        "GRPO seed $SEED=$(eval_json grpo_seed$SEED $questions)"
    cat "$OUT/$questions/table.md"
done

echo "done: $OUT"
