"""GAN losses of the VQ-GAN (TATS / Med-LSDM): hinge or least squares on patch logits, feature
matching between discriminator features of real and reconstructed images, and the weighting
that switches the adversarial terms on.

Written out rather than wrapping ``monai.losses.PatchAdversarialLoss``: MONAI passes the logits
through tanh (hinge) or LeakyReLU (least squares) first, which changes the losses (a generator
hinge of ``mean(relu(1 - tanh(l)))`` instead of ``-mean(l)``) and is not what the reference uses.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from medlsdm.errors import ConfigError

GAN_LOSSES = ("hinge", "least_squares")


def _check(kind: str) -> None:
    if kind not in GAN_LOSSES:
        raise ConfigError(f"loss.gan must be one of {GAN_LOSSES}, not {kind!r}")


def generator_loss(logits_fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """Adversarial loss of the generator: hinge ``-mean(D(fake))``; least squares ``mean((D(fake) - 1)^2)``."""
    _check(kind)
    if kind == "hinge":
        return -logits_fake.mean()
    return ((logits_fake - 1.0) ** 2).mean()


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """Discriminator loss, halved as in TATS: hinge ``(mean relu(1 - D(real)) + mean relu(1 + D(fake))) / 2``;
    least squares ``(mean (D(real) - 1)^2 + mean D(fake)^2) / 2``."""
    _check(kind)
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
    return 0.5 * (((logits_real - 1.0) ** 2).mean() + (logits_fake**2).mean())


def feature_matching_loss(features_fake: Sequence[torch.Tensor], features_real: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of the L1 distance between discriminator features of fake and real
    (the real features are targets: no gradient flows into them)."""
    if len(features_fake) != len(features_real) or not features_fake:
        raise ValueError(f"feature lists differ or are empty ({len(features_fake)} vs {len(features_real)})")
    losses = [F.l1_loss(f, r.detach()) for f, r in zip(features_fake, features_real)]
    return torch.stack(losses).mean()


def adversarial_weight(step: int, start_step: int, weight: float = 1.0, warmup: int = 0) -> float:
    """Weight of the adversarial terms at ``step``: 0 before ``start_step``, then ``weight``
    (reached linearly over ``warmup`` steps when given, to avoid a jolt when the discriminators
    switch on)."""
    if step < start_step:
        return 0.0
    if warmup > 0:
        return weight * min(1.0, (step - start_step + 1) / warmup)
    return weight


def adaptive_weight(reconstruction_loss: torch.Tensor, adversarial_loss: torch.Tensor,
                    last_layer: torch.Tensor, max_weight: float = 1e4) -> torch.Tensor:
    """Esser et al. 2021 (taming VQGAN): balance the adversarial gradient against the
    reconstruction gradient at the decoder's last layer, ``|grad rec| / (|grad adv| + 1e-4)``,
    clamped to [0, max_weight] and detached."""
    g_rec = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adversarial_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, max_weight).detach()
