"""Record the shipped demo model's outputs on fixed inputs for tests/test_layers.py, after the demo
weights change: the denoiser's prediction and the SPADE decoder's image for the label map and
latent stored in the previous recording, on 1 thread without flushing subnormals, with the
SHA-256 of the weights they belong to.

Run it only with code that reproduces the previous recording bit for bit for the previous weights
(`test_shipped_demo_weights_give_the_outputs_recorded_before` passing before the weights change),
so that the recording keeps guarding the code, not just the new weights.

    python tools/record_demo_outputs.py --previous tests/data/demo_outputs.npz \\
        --out tests/data/demo_outputs.npz
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import torch

DEMO = Path(__file__).resolve().parents[1] / "src" / "medlsdm" / "weights" / "demo"


def main() -> None:
    from medlsdm.data.labels import one_hot
    from medlsdm.inference import load_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--previous", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(False)
    previous = np.load(args.previous)
    model = load_model(DEMO)
    label = one_hot(torch.as_tensor(previous["label"]).long(), model.table.num_classes).float()
    z = torch.as_tensor(previous["z"])
    with torch.no_grad():
        eps = model.denoiser(z, torch.tensor([250]), label)
        image = model.autoencoder.decode(model.autoencoder.quantize(z)[0], label, out_shape=label.shape[2:])
    shas = {f"sha_{name}": hashlib.sha256((DEMO / f"{name}.safetensors").read_bytes()).hexdigest()
            for name in ("autoencoder", "diffusion")}
    np.savez_compressed(args.out, label=previous["label"], z=previous["z"], denoiser=eps.numpy(),
                        image=image.numpy(), **shas)
    print(f"recorded {args.out}: {shas}")


if __name__ == "__main__":
    main()
