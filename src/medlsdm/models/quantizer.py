"""The codebook of the VQ-GAN: a vector quantiser trained by exponential moving averages.

Written by hand rather than on ``monai.networks.layers.vector_quantizer.EMAQuantizer`` because
that class (MONAI 1.6.1) updates the codebook whenever the module is in train mode, even under
``torch.no_grad`` (REFERENCE.md §5), has no data-dependent initialisation, no restart of dead
codes, and nothing that stops a resumed run from re-initialising the codebook (a defect of the
Med-LSDM reference). Here:

* the codebook, the EMA cluster sizes and the EMA sums of assigned vectors are buffers, as is the
  flag ``initialized``: a checkpoint carries all of them, and a loaded codebook is never
  re-initialised;
* the codebook changes only in a training forward pass with gradients enabled
  (``self.training and torch.is_grad_enabled()``); evaluation, encoding and decoding never touch it;
* under ``torch.distributed`` the per-batch statistics are summed over ranks and the random
  vectors used for initialisation and restarts come from rank 0, so every rank keeps the same
  codebook.

The update follows van den Oord et al. 2017 (appendix) as used by TATS / Med-LSDM: with
``n_k`` vectors assigned to code ``k`` in the batch and ``s_k`` their sum,
``N_k <- decay N_k + (1-decay) n_k``, ``S_k <- decay S_k + (1-decay) s_k``,
``e_k = S_k / N~_k`` with Laplace-smoothed ``N~_k = (N_k + eps) / (sum N + K eps) * sum N``.
Dead codes are restarted from random encoder outputs of the batch. "Dead" is relative to the
expected usage: with ``N`` vectors per step and ``K`` codes, a code used as often as every other
has ``N_k -> N / K``; it is dead when ``N_k < dead_code_threshold * N / K``, and a restarted
code starts at ``N / K`` (its sum at ``N / K`` times its vector). An unused code is therefore
restarted again only after ``log(threshold) / log(decay)`` steps (349 at 0.03 and 0.99), at most
``N`` codes per step (the least used first), and the codebook settles. The reference (and this module before) used an absolute threshold of one
vector: at batch 1 with 16,384 codes and ~2,048 latent vectors per step ``N / K`` = 0.125, so
nearly every code fell below it after one step and ~97 % of the codebook was re-initialised at
every step, indefinitely (benchmarks/quality.md).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# Rows of the (vectors x codes) distance matrix computed at once: bounds its memory to ~256 MB
# (the reference builds the whole matrix: 32768 x 16384 floats = 2 GiB for one 32x256x256 block).
_DISTANCE_BUDGET = 2**26


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class EMAVectorQuantizer(nn.Module):
    """Nearest-code quantisation of ``(B, dim, *spatial)`` tensors with an EMA-trained codebook.

    ``forward(z)`` returns ``(z_q, loss, info)``: ``z_q`` the quantised tensor with a
    straight-through gradient to ``z``, ``loss`` the commitment loss
    ``commitment * mean((z - sg[z_q])^2)``, ``info`` a dict with ``perplexity`` (of the batch's
    code usage, in [1, num_codes]), ``usage`` (fraction of codes used by the batch),
    ``indices`` (``(B, *spatial)`` code indices) and, after a training update, ``restarts``
    (codes restarted by this step) and ``active`` (fraction of codes whose EMA usage was above the
    dead-code level before the restarts).
    """

    def __init__(self, num_codes: int = 16384, dim: int = 8, decay: float = 0.99,
                 commitment: float = 0.25, eps: float = 1e-5, dead_code_threshold: float = 0.03):
        super().__init__()
        if num_codes < 1 or dim < 1:
            raise ValueError(f"num_codes and dim must be positive, got {num_codes} and {dim}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"codebook decay must be in [0, 1), got {decay}")
        self.num_codes, self.dim = int(num_codes), int(dim)
        self.decay, self.commitment, self.eps = float(decay), float(commitment), float(eps)
        if dead_code_threshold < 0:
            raise ValueError(f"dead_code_threshold must be >= 0, got {dead_code_threshold}")
        self.dead_code_threshold = float(dead_code_threshold)
        self.register_buffer("codebook", torch.randn(self.num_codes, self.dim))
        self.register_buffer("cluster_size", torch.zeros(self.num_codes))
        self.register_buffer("embed_sum", torch.zeros(self.num_codes, self.dim))
        self.register_buffer("initialized", torch.tensor(False))

    # -- public helpers --------------------------------------------------------------------
    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors of ``(B, *spatial)`` integer indices, as ``(B, dim, *spatial)``."""
        return F.embedding(indices.long(), self.codebook).movedim(-1, 1)

    @torch.no_grad()
    def quantize_nearest(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` snapped to its nearest codes, without loss, gradient or codebook update
        (used to re-quantise latents produced by the diffusion model)."""
        flat = z.detach().movedim(1, -1).reshape(-1, self.dim).float()
        codes = self.codebook[self._nearest(flat)]
        return codes.reshape(*z.shape[:1], *z.shape[2:], self.dim).movedim(-1, 1).to(z.dtype)

    def codebook_range(self) -> tuple[float, float]:
        """Global (min, max) of the codebook entries (the reference's latent min-max scaling)."""
        return float(self.codebook.min()), float(self.codebook.max())

    # -- forward ---------------------------------------------------------------------------
    def forward(self, z: torch.Tensor):
        if z.shape[1] != self.dim:
            raise ValueError(f"quantiser expects {self.dim} channels, got tensor of shape {tuple(z.shape)}")
        # Distances and EMA statistics in fp32 even under autocast: fp16 matmuls mis-assign codes.
        with torch.autocast(device_type=z.device.type, enabled=False):
            zf = z.float()
            flat = zf.movedim(1, -1).reshape(-1, self.dim)
            update = self.training and torch.is_grad_enabled()
            if update and not bool(self.initialized):
                self._initialise(flat.detach())
            indices = self._nearest(flat.detach())
            z_q = self.codebook[indices].reshape(*zf.shape[:1], *zf.shape[2:], self.dim).movedim(-1, 1)
            counts = torch.bincount(indices, minlength=self.num_codes).to(flat.dtype)
            restart_info = self._ema_update(flat.detach(), indices, counts.clone()) if update else {}
            loss = self.commitment * F.mse_loss(zf, z_q.detach())
            # Straight-through estimator: the decoder's gradient is passed to the encoder as is.
            # Without a graph, the exact code vectors (z + (z_q - z) is not bit-exact z_q).
            z_st = zf + (z_q - zf).detach() if (zf.requires_grad and torch.is_grad_enabled()) else z_q
        probs = counts / counts.sum().clamp_min(1.0)
        perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())
        info = {"perplexity": perplexity.detach(), "usage": (counts > 0).float().mean().detach(),
                "indices": indices.reshape(*z.shape[:1], *z.shape[2:]), **restart_info}
        return z_st.to(z.dtype), loss, info

    # -- internals -------------------------------------------------------------------------
    @torch.no_grad()
    def _nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row, in chunks to bound the distance matrix."""
        codebook, flat = self.codebook.float(), flat.float()
        code_sq = (codebook**2).sum(1)
        chunk = max(1, _DISTANCE_BUDGET // self.num_codes)
        out = []
        with torch.autocast(device_type=flat.device.type, enabled=False):  # fp32 distances
            for part in flat.split(chunk):
                # |x - e|^2 = |x|^2 - 2 x.e + |e|^2; |x|^2 is constant per row and left out.
                dist2 = torch.addmm(code_sq.unsqueeze(0), part, codebook.t(), alpha=-2.0)
                out.append(dist2.argmin(1))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=flat.device)

    @torch.no_grad()
    def _random_vectors(self, flat: torch.Tensor, n: int) -> torch.Tensor:
        """``n`` encoder outputs of the batch chosen at random (rank 0's choice on every rank).

        Drawn without replacement when the batch holds enough vectors, so restarted codes are
        distinct batch vectors; otherwise with replacement plus a little noise so that codes
        initialised from the same vector can still separate.
        """
        if flat.shape[0] >= n:
            chosen = flat[torch.randperm(flat.shape[0], device=flat.device)[:n]]
        else:
            chosen = flat[torch.randint(flat.shape[0], (n,), device=flat.device)]
            chosen = chosen + torch.randn_like(chosen) * (0.01 / self.dim**0.5) * flat.std(correction=0).clamp_min(1e-6)
        chosen = chosen.contiguous()
        if _distributed():
            dist.broadcast(chosen, src=0)
        return chosen

    def _expected_usage(self, vectors: int) -> float:
        """EMA count of a code when ``vectors`` per step are spread evenly over all codes."""
        return max(float(vectors), 1.0) / self.num_codes

    @torch.no_grad()
    def _initialise(self, flat: torch.Tensor) -> None:
        """Data-dependent initialisation: codes = random encoder outputs of the first batch, each
        with the expected usage as its starting count."""
        vectors = self._random_vectors(flat, self.num_codes)
        n = torch.tensor(float(flat.shape[0]), device=flat.device)
        if _distributed():
            dist.all_reduce(n)
        expected = self._expected_usage(int(n))
        self.codebook.copy_(vectors)
        self.embed_sum.copy_(vectors * expected)
        self.cluster_size.fill_(expected)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> dict:
        sums = torch.zeros_like(self.embed_sum).index_add_(0, indices, flat)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.num_codes * self.eps) * total
        self.codebook.copy_(self.embed_sum / smoothed.unsqueeze(1))
        total = int(counts.sum())   # vectors of this step on all ranks: the same number everywhere
        return self._restart_dead_codes(flat, self._expected_usage(total), total)

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor, expected: float, limit: int) -> dict:
        # The dead mask is identical on all ranks (statistics were all-reduced), so every rank
        # takes part in the same broadcast or in none.
        level = self.dead_code_threshold * expected
        dead_mask = self.cluster_size < level
        active = 1.0 - dead_mask.float().mean()
        # At most as many restarts per step as the batch has vectors, the least used codes first:
        # codes that went unused together (all of them start at N / K) come back spread over
        # several steps instead of in one wave every ~349 steps.
        n_dead = min(int(dead_mask.sum()), limit)
        if n_dead:
            dead = torch.topk(self.cluster_size, n_dead, largest=False).indices
            vectors = self._random_vectors(flat, n_dead)
            self.codebook[dead] = vectors
            # Reset the EMA statistics too, so the next update keeps the restarted code instead of
            # pulling it back to the stale sum (the reference's restarts lasted one step).
            self.cluster_size[dead] = expected
            self.embed_sum[dead] = vectors * expected
        return {"restarts": torch.tensor(n_dead), "active": active}
