#!/usr/bin/env bash
# Register every pair of a CSV on a SLURM cluster: one torchrun per node, one rank per GPU.
# Each rank takes its own shard of the pairs; rank 0 writes OUTPUT/summary.csv at the end.
#
#   sbatch examples/slurm_register_many.sh pairs.csv /shared/out/cohort [extra nir options...]
#   e.g. ... -c configs/model/displacement.yaml --trainer.max_steps=800
#
# Submit from the repository root (the -c configs/... path below is relative to it).
# OUTPUT must be on a filesystem that all nodes share. The run is resumable: if the job hits its
# time limit (or a node dies), submit the same command again; complete pairs are skipped.
#
#SBATCH --job-name=nir-many
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out

set -euo pipefail
PAIRS=${1:?usage: sbatch $0 PAIRS.csv OUTPUT_DIR [extra nir register options]}
OUTPUT=${2:?usage: sbatch $0 PAIRS.csv OUTPUT_DIR [extra nir register options]}
shift 2

# activate your environment here, e.g.: source ~/venvs/nir/bin/activate
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-4}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export OMP_NUM_THREADS=$(( ${SLURM_CPUS_PER_TASK:-16} / GPUS_PER_NODE > 0 ? ${SLURM_CPUS_PER_TASK:-16} / GPUS_PER_NODE : 1 ))
export WANDB_MODE=${WANDB_MODE:-disabled}

srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_NNODES" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$HEAD:29500" \
    -m nir_lightning.cli register-many --pairs "$PAIRS" --output "$OUTPUT" \
    -c configs/trainer/gpu.yaml "$@"
