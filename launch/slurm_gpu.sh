#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per GPU.
#
#   sbatch --nodes=2 launch/slurm_gpu.sh --config configs/mosi.py \
#       --config.data.path=/data/mosi.pkl --workdir /shared/runs/mosi
#
# jax.distributed.initialize() reads the SLURM environment (coordinator =
# first node, process id = SLURM_PROCID) when DECALIGN_DISTRIBUTED=1. The
# workdir must be on a filesystem every node sees.
#SBATCH --job-name=decalign
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
set -euo pipefail
export DECALIGN_DISTRIBUTED=1
srun --kill-on-bad-exit=1 python -m decalign_jax.train "$@"
