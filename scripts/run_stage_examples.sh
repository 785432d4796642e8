#!/usr/bin/env bash
# Run the real example configs (configs/*.yaml) one after another; the README's stage table has
# the numbers they gave. Each run writes runs/<name>/summary.json; `deltatune eval` adds base vs
# tuned under "eval" (the preference/RL recipes score base and tuned themselves).
# Usage: scripts/run_stage_examples.sh [name ...]   (default: all, in order; ppo needs reward first)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
RUNS=("$@")
[ ${#RUNS[@]} -gt 0 ] || RUNS=(classify-tweets-head classify-tweets-lora mlm-tweets classify-tweets-after-mlm tokens-ner pt-docs
  reward-smollm2 ppo-smollm2 grpo-smollm2 dpo-smollm2-chitchat)
declare -A EVAL=([classify-tweets-lora]=1 [mlm-tweets]=1 [tokens-ner]=1 [pt-docs]=1)
for name in "${RUNS[@]}"; do
  echo "=== $name $(date +%T) load: $(cut -d' ' -f1-3 /proc/loadavg)"
  start=$(date +%s)
  "$BIN/deltatune" train "configs/$name.yaml" overwrite=true
  echo "=== $name trained in $(( $(date +%s) - start )) s"
  if [ -n "${EVAL[$name]:-}" ]; then
    "$BIN/deltatune" eval "runs/$name"
    echo "=== $name evaluated, total $(( $(date +%s) - start )) s"
  fi
done
