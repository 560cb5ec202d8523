#!/bin/bash
# How the demo model shipped in src/medlsdm/weights/demo/ was made (CPU, fp32, shared 2-core
# machine). `medlsdm demo --train` runs the same recipe on a budget.
#   autoencoder: 945 steps in 12 minutes (2 threads, machine shared with other jobs)
#   denoiser:    2,716 steps in 40 minutes (OMP_NUM_THREADS=1, the other core busy), v-prediction
#   decoder:     SPADE decoder on the frozen encoder, 818 steps in 18 minutes (2 threads); it
#                replaces the plain decoder in the diffusion run (the latents do not change)
set -euo pipefail
medlsdm demo-data --out cohort                                    # 24 subjects, 64^3 at 3 mm, seed 0
medlsdm prepare cohort --out prepared --config demo
medlsdm train autoencoder --data prepared --out runs/autoencoder --config demo --set trainer.max_minutes=12
OMP_NUM_THREADS=1 medlsdm train diffusion --data prepared --autoencoder runs/autoencoder --out runs/diffusion \
    --config demo --set trainer.max_minutes=40                     # re-running resumes
medlsdm train autoencoder --data prepared --out runs/decoder_spade --config demo --set model.decoder=spade \
    --set model.spade_hidden=32 --set init.from=runs/autoencoder --set init.freeze_encoder=true \
    --set trainer.max_minutes=18
medlsdm train attach-decoder --model runs/diffusion --autoencoder runs/decoder_spade
mkdir -p demo-weights && cp runs/diffusion/{diffusion,autoencoder}.{safetensors,json} demo-weights/
# stored in float16 to halve the package size (loaded into float32 models; DDIM-25 PSNR on two
# held-out cases 23.675 dB against 23.674 dB in float32)
python - <<'PY'
from safetensors.torch import load_file, save_file
for name in ("autoencoder", "diffusion"):
    path = f"demo-weights/{name}.safetensors"
    state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(path).items()}
    save_file(state, path, metadata={"format": "pt"})
PY
# The training geometry, per-class statistics and label scheme in diffusion.json, which
# `medlsdm sample` uses to put label maps of any grid where the model has seen data, are written
# by `train diffusion`; the shipped sidecar predates them and had them added from the prepared
# cohort with medlsdm.data.statistics.training_summary (the same 16 training cases).
