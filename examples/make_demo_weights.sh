#!/bin/bash
# How the demo model shipped in src/medlsdm/weights/demo/ was made (CPU, fp32, 2-core machine).
# `medlsdm demo --train` runs a shorter recipe on a budget.
#   autoencoder: 945 steps in 12 minutes (2 threads, machine shared with other jobs)
#   decoder:     SPADE decoder on the frozen encoder, 818 steps without a perceptual loss, then
#                upsampling by interpolation + convolution (no checkerboard) and the LPIPS-VGG
#                perceptual loss (real weights of ../shared/weights), 600 steps, warm-started
#                from it (every weight but the upsampling layers)
#   stage 1 fine-tuned as a whole: encoder, codebook and SPADE decoder together, L1 (weight 4) +
#                LPIPS-VGG at weight 1 (instead of 4), lr 1e-4, 1,200 steps (29 minutes, 2 threads,
#                quiet machine); then the decoder alone on the frozen encoder at lr 3e-5, 400 steps
#                (held-out PSNR 28.8 -> 30.2 dB, benchmarks/quality.md)
#   denoiser:    v-prediction, trained from scratch on the fine-tuned encoder's latents, 2,716
#                steps (33 minutes, 2 threads, the other stage-1 run beside it for 25 of them)
set -euo pipefail
medlsdm demo-data --out cohort                                    # 24 subjects, 64^3 at 3 mm, seed 0
medlsdm prepare cohort --out prepared --config demo
medlsdm train autoencoder --data prepared --out runs/autoencoder --config demo --set trainer.max_minutes=12
medlsdm train autoencoder --data prepared --out runs/decoder_spade --config demo --set model.decoder=spade \
    --set model.spade_hidden=32 --set model.upsample=transposed --set init.from=runs/autoencoder \
    --set init.freeze_encoder=true --set loss.perceptual=0 --set trainer.max_minutes=18
W=../shared/weights                                                # LPIPS-VGG backbone and v0.1 heads
OMP_NUM_THREADS=1 medlsdm train autoencoder --data prepared --out runs/decoder_interp --config demo \
    --set model.decoder=spade --set model.spade_hidden=32 --set init.from=runs/decoder_spade \
    --set init.freeze_encoder=true --set loss.lpips_backbone=$W/vgg16-features.pth \
    --set loss.lpips_heads=$W/lpips-v0.1-vgg-heads.pth --set trainer.max_steps=600
OMP_NUM_THREADS=2 medlsdm train autoencoder --data prepared --out runs/stage1_ft --config demo \
    --set model.decoder=spade --set model.spade_hidden=32 --set init.from=runs/decoder_interp \
    --set loss.perceptual=1.0 --set loss.lpips_backbone=$W/vgg16-features.pth \
    --set loss.lpips_heads=$W/lpips-v0.1-vgg-heads.pth --set optim.lr=1e-4 --set trainer.max_steps=1200
#   (the shipped run started from the float16 copy of runs/decoder_interp shipped before it)
OMP_NUM_THREADS=2 medlsdm train diffusion --data prepared --autoencoder runs/stage1_ft --out runs/diffusion_ft \
    --config demo --set trainer.max_steps=2716 &                  # beside the decoder's run below
DENOISER=$!
trap 'kill "$DENOISER" 2>/dev/null || true' EXIT                 # not left running if a step below fails
OMP_NUM_THREADS=1 medlsdm train autoencoder --data prepared --out runs/decoder_ft --config demo \
    --set model.decoder=spade --set model.spade_hidden=32 --set init.from=runs/stage1_ft \
    --set init.freeze_encoder=true --set loss.perceptual=1.0 --set loss.lpips_backbone=$W/vgg16-features.pth \
    --set loss.lpips_heads=$W/lpips-v0.1-vgg-heads.pth --set optim.lr=3e-5 --set trainer.max_steps=400
wait "$DENOISER"
medlsdm train attach-decoder --model runs/diffusion_ft --autoencoder runs/decoder_ft
mkdir -p demo-weights && cp runs/diffusion_ft/{diffusion,autoencoder}.{safetensors,json} demo-weights/
# stored in float16 to halve the package size (loaded into float32 models; DDIM-25 PSNR on two
# held-out cases 23.675 dB against 23.674 dB in float32)
python - <<'PY'
from safetensors.torch import load_file, save_file
for name in ("autoencoder", "diffusion"):
    path = f"demo-weights/{name}.safetensors"
    state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(path).items()}
    save_file(state, path, metadata={"format": "pt"})
PY
# The training geometry, per-class statistics, label scheme and appearance profile in
# diffusion.json, which `medlsdm sample` uses to put label maps of any grid where the model has
# seen data and to give samples the appearance of training scans, are written by `train diffusion`.
