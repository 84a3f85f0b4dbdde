#!/usr/bin/env bash
# SI vs Fisher cost, each process started from this small shell under GNU time (its peak RSS is its own):
# the seed-0 general stage of eval/alora_bench/reproduce.py with and without importance recording (5 steps: the peak is
# reached in the first step), and `alora fisher` at 8 sequences (the peak does not grow with the count).
# Needs `bash scripts/reproduce.sh sweep` first (its model, data and configs under work/reproduce/).
set -euo pipefail
cd "$(dirname "$0")/.."
export AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PATH="$PWD/.venv/bin:$PATH"
out=work/importance-cost; mkdir -p $out
python - "$out" <<'PY'
import sys, yaml
out = sys.argv[1]
cfg = yaml.safe_load(open("work/reproduce/configs/s0/general.yml"))
cfg.update(max_steps=5, output_dir=f"{out}/general-si", alora_record_importance=True)
yaml.safe_dump(cfg, open(f"{out}/general-si.yml", "w"), sort_keys=False)
del cfg["alora_record_importance"]  # no alora_ key: the plugin stays inert (a `false` alone is refused as a no-op)
cfg.update(output_dir=f"{out}/general-plain")
yaml.safe_dump(cfg, open(f"{out}/general-plain.yml", "w"), sort_keys=False)
PY
report() { echo "$1: $(grep -E 'Maximum resident|Elapsed \(wall' $out/$1.log | sed 's/^\s*//' | tr '\n' ';')"; }
for c in ${STAGES:-general-si general-plain}; do /usr/bin/time -v axolotl train $out/$c.yml > $out/$c.log 2>&1; report $c; done
/usr/bin/time -v alora fisher --base work/reproduce/smollm2 --data work/reproduce/data/general_train.jsonl --samples 8 \
  --max-length 256 --out $out/fisher.safetensors --no-progress > $out/fisher.log 2>&1
report fisher; grep '^cost' $out/fisher.log
