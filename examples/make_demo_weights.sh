#!/bin/bash
# How the demo model shipped in src/medlsdm/weights/demo/ was made (CPU, fp32, shared 2-core
# machine). `medlsdm demo --train` runs the same recipe on a budget.
#   autoencoder: 945 steps in 12 minutes (2 threads, machine shared with other jobs)
#   denoiser:    2,716 steps in 40 minutes (OMP_NUM_THREADS=1, the other core busy), v-prediction
#   decoder:     SPADE decoder on the frozen encoder, upsampling by interpolation + convolution (no
#                checkerboard), LPIPS-VGG perceptual loss with the real weights of ../shared/weights,
#                600 steps (1 thread, machine shared), warm-started from the previous SPADE decoder
#                (every weight but the upsampling layers); it replaces the decoder in the diffusion
#                run (the latents do not change). The previous shipped decoder (818 steps, transposed
#                convolutions, no perceptual loss) is the `init.from` below (the shipped decoder
#                was warm-started from its float16 copy, the weights shipped before it).
set -euo pipefail
medlsdm demo-data --out cohort                                    # 24 subjects, 64^3 at 3 mm, seed 0
medlsdm prepare cohort --out prepared --config demo
medlsdm train autoencoder --data prepared --out runs/autoencoder --config demo --set trainer.max_minutes=12
OMP_NUM_THREADS=1 medlsdm train diffusion --data prepared --autoencoder runs/autoencoder --out runs/diffusion \
    --config demo --set trainer.max_minutes=40                     # re-running resumes
medlsdm train autoencoder --data prepared --out runs/decoder_spade --config demo --set model.decoder=spade \
    --set model.spade_hidden=32 --set model.upsample=transposed --set init.from=runs/autoencoder \
    --set init.freeze_encoder=true --set loss.perceptual=0 --set trainer.max_minutes=18
W=../shared/weights                                                # LPIPS-VGG backbone and v0.1 heads
OMP_NUM_THREADS=1 medlsdm train autoencoder --data prepared --out runs/decoder_interp --config demo \
    --set model.decoder=spade --set model.spade_hidden=32 --set init.from=runs/decoder_spade \
    --set init.freeze_encoder=true --set loss.lpips_backbone=$W/vgg16-features.pth \
    --set loss.lpips_heads=$W/lpips-v0.1-vgg-heads.pth --set trainer.max_steps=600
medlsdm train attach-decoder --model runs/diffusion --autoencoder runs/decoder_interp
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
# The training geometry, per-class statistics, label scheme and appearance profile in
# diffusion.json, which `medlsdm sample` uses to put label maps of any grid where the model has
# seen data and to give samples the appearance of training scans, are written by `train
# diffusion`; the shipped sidecar predates them and had them added from the prepared cohort with
# medlsdm.data.statistics.training_summary (the same 16 training cases; the appearance profile's
# background level and background noise were added the same way when profiles gained them, the
# per-scan statistics checked to be the same values).
