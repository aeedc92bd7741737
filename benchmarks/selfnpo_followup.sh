#!/usr/bin/env bash
# The Self-NPO second follow-up (benchmarks/RESULTS.md): three Self-NPO negatives started from rendered images,
# two labelled controls, each measured in the negative branch (selfnpo_effect.py, with the empty negative prompt
# and, exploratory, with the prompt itself) and diagnosed (selfnpo_diagnose.py). About 50 minutes on 2 idle
# cores; writes runs/followup/. Usage: bash benchmarks/selfnpo_followup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
bin=.venv/bin
R=runs/followup
mkdir -p "$R"

$bin/diffalign toy render-captions --out "$R/captions.parquet"                                # 2048 rows
$bin/diffalign toy render-pairs --kind fidelity --exclude-heldout --out "$R/fid_pairs.parquet"  # 512 pairs

IMG=(--selfnpo_start=images "--dataset_name=$R/captions.parquet" "--image_columns=[image]" --caption_column=caption
     --teacher_ema_decay=0.999)
train() { local name=$1; shift; [ -f "$R/$name/train_report.json" ] || $bin/diffalign train "$@" "--output_dir=$R/$name"; }
train sn_img configs/toy_selfnpo.yaml "${IMG[@]}" --max_train_steps=600 --validation_steps=600 --checkpointing_steps=200
train sn_img_w5 configs/toy_selfnpo.yaml "${IMG[@]}" --teacher_guidance=-5 --max_train_steps=600 --validation_steps=600 \
  --checkpointing_steps=200
train sn_full configs/toy_selfnpo.yaml "${IMG[@]}" --train_mode=full --learning_rate=1e-6 --max_train_steps=1000 \
  --validation_steps=1000 --checkpointing_steps=500
train npo_fid configs/toy_npo.yaml "--dataset_name=$R/fid_pairs.parquet"
train sft_wrong configs/toy_sft.yaml "--dataset_name=$R/fid_pairs.parquet" "--label_columns=[label_1,label_0]" \
  --max_train_steps=600 --validation_steps=600 --checkpointing_steps=200

for n in sn_img sn_img_w5 sn_full npo_fid sft_wrong; do
  $bin/python benchmarks/selfnpo_effect.py --negative "$R/$n" --json "$R/effect_$n.json"
  $bin/python benchmarks/selfnpo_effect.py --negative "$R/$n" --negative-prompt prompt --json "$R/effect_prompt_$n.json"
  $bin/python benchmarks/selfnpo_diagnose.py --negative "$R/$n" --json "$R/diagnose_$n.json"
done
$bin/python benchmarks/selfnpo_diagnose.py --curve --failures --json "$R/curve.json"
$bin/python benchmarks/plot_selfnpo_followup.py "$R" --out benchmarks/selfnpo_followup.png
