#!/usr/bin/env bash
# SJD2 fine-tuning on one node: NPROC processes under torchrun, DeepSpeed ZeRO-3 when NPROC > 1.
#
#   launch/finetune.sh MODEL NPROC [hydra overrides...]
#   launch/finetune.sh tiny 2                                   # CPU: 2 processes, gloo, fp32 (zero3_cpu.json)
#   launch/finetune.sh tiny 2 train.max_steps=20 wandb.mode=offline
#   launch/finetune.sh lumina_mgpt_768 8 train.data.path=data/shards/lumina_mgpt_768   # 8 GPUs, bf16 (zero3.json)
#   launch/finetune.sh emu3_720 8
#
# MODEL is a conf/model/*.yaml name; the train recipe defaults to the model family's (tiny* -> sjd2_tiny,
# lumina_mgpt* -> sjd2_lumina_mgpt, emu3* -> sjd2_emu3,
# janus* -> sjd2_janus_pro); pass train=<name> to choose another. The script only
# forwards arguments: everything else is a Hydra override of conf/train.yaml. Rerunning the same command
# resumes from the newest checkpoint in run_dir. global_batch must be divisible by NPROC x micro_batch.
# Env: PY (python, default .venv/bin/python), TORCHRUN_ARGS (extra torchrun flags),
# DRY_RUN=1 (print the plan for NPROC GPUs and exit: `make finetune MODEL=lumina_mgpt DRY_RUN=1`).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -lt 2 ]]; then
    echo "usage: $0 MODEL NPROC [hydra overrides...]   (e.g. $0 tiny 2 train.max_steps=20)" >&2
    exit 2
fi
MODEL=$1
NPROC=$2
shift 2
if ! [[ $NPROC =~ ^[1-9][0-9]*$ ]]; then
    echo "NPROC must be a positive integer (processes on this node), got '$NPROC'" >&2
    exit 2
fi
if [[ ! -f conf/model/$MODEL.yaml ]]; then
    echo "unknown MODEL '$MODEL'; pick one of: $(cd conf/model && ls *.yaml | sed 's/\.yaml$//' | tr '\n' ' ')" >&2
    exit 2
fi

RECIPE=()
if ! printf '%s\n' "$@" | grep -q '^train='; then
    case $MODEL in
        lumina_mgpt*) RECIPE=(train=sjd2_lumina_mgpt) ;;
        emu3*) RECIPE=(train=sjd2_emu3) ;;
        janus*) RECIPE=(train=sjd2_janus_pro) ;;
        *) RECIPE=(train=sjd2_tiny) ;;
    esac
fi

PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export WANDB_MODE=${WANDB_MODE:-disabled}
if [[ ${DRY_RUN:-0} == 1 ]]; then  # the plan for NPROC GPUs (train/dryrun.py): one process, nothing loaded
    exec "$PY" -m train model="$MODEL" "${RECIPE[@]}" dry_run=true gpus="$NPROC" "$@"
fi
# shellcheck disable=SC2086
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" ${TORCHRUN_ARGS:-} \
    -m train model="$MODEL" "${RECIPE[@]}" "$@"
