import os

import numpy as np
import pytest

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Seeded numpy/torch for every test; torch limited to the CI machine's 2 cores."""
    np.random.seed(0)
    try:
        import torch

        torch.manual_seed(0)
        torch.set_num_threads(2)
        # Tiny random networks can drive activations into subnormal floats, which are ~100x slower
        # on x86 CPUs; flushing them to zero keeps test times predictable.
        torch.set_flush_denormal(True)
    except ImportError:  # pragma: no cover
        pass
    yield
