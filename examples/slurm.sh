#!/bin/bash
# Stage-2 training of Med-LSDM on 2 nodes x 4 GPUs with SLURM. Lightning reads the SLURM
# environment (ranks, master address) itself; `srun` starts one process per GPU.
#SBATCH --job-name=medlsdm-diffusion
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00

set -euo pipefail
srun .venv/bin/medlsdm train diffusion \
    --data prepared/duke --autoencoder runs/duke-ae --out runs/duke-lsdm --config lsdm \
    --set trainer.devices=4 --set trainer.num_nodes=2 --set trainer.precision=bf16-mixed
# Re-submitting the same script resumes from runs/duke-lsdm/checkpoints/last.ckpt.
# With torchrun instead of SLURM:
#   torchrun --nnodes 2 --nproc-per-node 4 --rdzv-endpoint HOST:29500 .venv/bin/medlsdm train diffusion ...
