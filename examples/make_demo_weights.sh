#!/bin/bash
# How the demo model shipped in src/medlsdm/weights/demo/ was made (2 CPU cores, fp32, shared
# machine; about 37 minutes of training). `medlsdm demo --train` runs the same recipe on a budget.
set -euo pipefail
medlsdm demo-data --out cohort                                    # 24 subjects, 64^3 at 3 mm, seed 0
medlsdm prepare cohort --out prepared --config demo
medlsdm train autoencoder --data prepared --out runs/autoencoder --config demo --set trainer.max_minutes=12
medlsdm train diffusion --data prepared --autoencoder runs/autoencoder --out runs/diffusion --config demo \
    --set trainer.max_minutes=16
# re-running resumes; a second run of 9 minutes brought the denoiser to 2,626 steps
medlsdm train diffusion --data prepared --autoencoder runs/autoencoder --out runs/diffusion --config demo \
    --set trainer.max_minutes=9
mkdir -p demo-weights && cp runs/diffusion/{diffusion,autoencoder}.{safetensors,json} demo-weights/
# stored in float16 to halve the package size (loaded into float32 models)
python - <<'PY'
from safetensors.torch import load_file, save_file
for name in ("autoencoder", "diffusion"):
    path = f"demo-weights/{name}.safetensors"
    state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(path).items()}
    save_file(state, path, metadata={"format": "pt"})
PY
