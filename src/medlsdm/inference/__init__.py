"""The inference core: everything `medlsdm sample` needs, and nothing of training.

- `model`: loading a trained run (denoiser, autoencoder, sidecar as a typed `ModelCard`);
- `labelmaps`: a label map file (any grid, any scheme) -> the model's classes on its grid;
- `synthesis`: sampling and decoding on that grid (whole, or in blended tiles);
- `pipeline`: files in, files out (`sample_to_files`), with a report of what was done;
- `editing`: an edited label map sampled beside the original from the same noise.

Dependency rule (tests/test_architecture.py): `medlsdm.inference` imports neither Lightning nor
`medlsdm.training` / `medlsdm.evaluation`; training and evaluation use it, not the reverse.
"""

from medlsdm.inference.model import ModelCard, SynthesisModel, load_autoencoder, load_model, resolve_device
from medlsdm.inference.pipeline import sample_to_files
from medlsdm.inference.synthesis import decode, synthesize, x0_clip

__all__ = ["ModelCard", "SynthesisModel", "decode", "load_autoencoder", "load_model", "resolve_device",
           "sample_to_files", "synthesize", "x0_clip"]
