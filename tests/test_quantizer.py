"""The EMA codebook: hand-computed EMA update, dead-code restarts, one-time data-dependent
initialisation (also across state_dict loads), no updates outside grad-enabled training,
straight-through gradient, perplexity, and identical codebooks across DDP ranks."""

import pytest
import torch

from medlsdm.models import quantizer as quantizer_module
from medlsdm.models.quantizer import EMAVectorQuantizer


def _as_map(vectors):
    """(N, dim) rows -> a (1, dim, N, 1, 1) feature map, the quantiser's input layout."""
    return torch.as_tensor(vectors, dtype=torch.float32).t().reshape(1, -1, len(vectors), 1, 1)


def _set_codebook(q, codes, counts=None):
    codes = torch.as_tensor(codes, dtype=torch.float32)
    counts = torch.ones(len(codes)) if counts is None else torch.as_tensor(counts, dtype=torch.float32)
    q.codebook.copy_(codes)
    q.cluster_size.copy_(counts)
    q.embed_sum.copy_(codes * counts[:, None])
    q.initialized.fill_(True)


def _buffers(q):
    return {k: v.clone() for k, v in q.state_dict().items()}


def test_ema_update_matches_hand_computation():
    q = EMAVectorQuantizer(num_codes=3, dim=2, decay=0.5, commitment=0.25, eps=0.0, dead_code_threshold=0.0)
    _set_codebook(q, [[0, 0], [10, 0], [0, 10]])
    z = _as_map([[1, 1], [-1, 0], [9, 1], [11, -1]])
    z_q, loss, info = q.train()(z)
    # Assignments 0, 0, 1, 1; code 2 unused. N = 0.5*1 + 0.5*[2, 2, 0] = [1.5, 1.5, 0.5];
    # S = 0.5*e + 0.5*[[0, 1], [20, 0], [0, 0]] = [[0, .5], [15, 0], [0, 5]]; e = S / N.
    assert info["indices"].flatten().tolist() == [0, 0, 1, 1]
    assert torch.allclose(q.cluster_size, torch.tensor([1.5, 1.5, 0.5]))
    assert torch.allclose(q.codebook, torch.tensor([[0, 1 / 3], [10, 0], [0, 10]]), atol=1e-6)
    # The output uses the codes from before the update; the loss is the commitment term.
    expected_q = _as_map([[0, 0], [0, 0], [10, 0], [10, 0]])
    assert torch.equal(z_q.detach(), expected_q)
    assert loss.item() == pytest.approx(0.25 * ((z - expected_q) ** 2).mean().item())


def test_dead_codes_are_restarted_from_batch_vectors():
    # threshold 1.0 = dead below the expected usage N / K = 8 / 4 = 2 vectors per step
    q = EMAVectorQuantizer(num_codes=4, dim=2, decay=0.5, dead_code_threshold=1.0)
    _set_codebook(q, [[0, 0], [100, 100], [-100, 100], [100, -100]])
    batch = [[0.1 * i, -0.05 * i] for i in range(8)]  # all nearest to code 0
    _, _, info = q.train()(_as_map(batch))
    rows = torch.tensor(batch)
    for k in (1, 2, 3):  # N = 0.5 < 2: restarted from distinct batch vectors, stats reset to N / K
        assert (q.codebook[k] == rows).all(dim=1).any(), f"code {k} is not a batch vector"
        assert q.cluster_size[k] == 2.0
        assert torch.allclose(q.embed_sum[k], 2.0 * q.codebook[k])
    assert len({tuple(q.codebook[k].tolist()) for k in (1, 2, 3)}) == 3
    # Code 0 got all 8 vectors: N = 4.5, kept and moved to the EMA mean (not restarted).
    assert q.cluster_size[0] == pytest.approx(4.5)
    assert torch.allclose(q.codebook[0], (rows.sum(0) * 0.5) / 4.5, atol=1e-4)
    assert int(info["restarts"]) == 3 and float(info["active"]) == 0.25   # measured before the restarts


def test_codebook_settles_when_codes_outnumber_vectors():
    """Many more codes than latent vectors per step (16,384 codes, ~2,048 vectors at batch 1 in
    the published setting): an absolute threshold of one vector restarted nearly every code at
    every step; relative to N / K, codes unused for a while are restarted, then left alone."""
    torch.manual_seed(0)
    centres = torch.randn(6, 4) * 3

    def batch():
        return _as_map(centres[torch.randint(6, (32,))] + 0.1 * torch.randn(32, 4))

    relative = EMAVectorQuantizer(num_codes=256, dim=4, decay=0.99).train()
    restarts = [int(relative(batch())[2]["restarts"]) for _ in range(60)]
    assert sum(restarts[1:]) == 0, restarts  # 256 codes, 32 vectors: none restarted within 60 steps
    # The published rule for comparison: every code not used in a step is restarted.
    absolute = EMAVectorQuantizer(num_codes=256, dim=4, decay=0.99).train()
    absolute(batch())
    absolute.cluster_size.fill_(1.0)
    with torch.no_grad():
        absolute.dead_code_threshold = 1.0 / absolute._expected_usage(32)  # one vector, as the reference
    info = absolute(batch())[2]
    assert float(info["active"]) < 0.2 and int(info["restarts"]) == 32   # nearly all dead; N restarted


def test_unused_codes_are_restarted_after_the_dead_level():
    q = EMAVectorQuantizer(num_codes=4, dim=2, decay=0.5, dead_code_threshold=0.03).train()
    _set_codebook(q, [[0, 0], [100, 100], [-100, 100], [100, -100]], counts=[2.0] * 4)
    batch = _as_map([[0.1 * i, -0.05 * i] for i in range(8)])  # always code 0
    restarts = [int(q(batch)[2]["restarts"]) for _ in range(8)]
    # N / K = 2; unused codes decay 2 -> 1 -> 0.5 -> ... and fall below 0.06 at the 6th step
    assert restarts[:5] == [0] * 5 and restarts[5] == 3, restarts


def test_restarts_are_spread_not_in_waves():
    """Codes left unused together fall below the dead level together; at most N (the batch's
    vectors) are restarted per step, the least used first, so the waves flatten out."""
    torch.manual_seed(0)
    q = EMAVectorQuantizer(num_codes=512, dim=4, decay=0.5).train()
    centres = torch.randn(4, 4) * 3
    per_step = []
    for _ in range(80):
        per_step.append(int(q(_as_map(centres[torch.randint(4, (16,))] + 0.1 * torch.randn(16, 4)))[2]["restarts"]))
    assert max(per_step) <= 16, per_step
    assert sum(per_step[10:]) > 0                      # dead codes do come back, 16 at a time
    busy = [n for n in per_step[10:] if n]
    assert len(busy) > 5, per_step                     # over many steps, not in one or two waves


def test_data_dependent_init_happens_once_and_survives_state_dict(monkeypatch):
    q = EMAVectorQuantizer(num_codes=8, dim=3).train()
    calls = []
    original = q._initialise
    monkeypatch.setattr(q, "_initialise", lambda flat: (calls.append(1), original(flat)))
    first = torch.randn(2, 3, 4, 4, 2)
    q(first)
    assert calls == [1] and bool(q.initialized)
    q(torch.randn(2, 3, 4, 4, 2) + 50.0)
    assert calls == [1], "second batch re-initialised the codebook"

    fresh = EMAVectorQuantizer(num_codes=8, dim=3).train()
    fresh.load_state_dict(q.state_dict())
    assert bool(fresh.initialized) and torch.equal(fresh.codebook, q.codebook)
    fresh_calls = []
    fresh_original = fresh._initialise
    monkeypatch.setattr(fresh, "_initialise", lambda flat: (fresh_calls.append(1), fresh_original(flat)))
    fresh(torch.randn(2, 3, 4, 4, 2))
    assert fresh_calls == [], "a loaded codebook was re-initialised"


def test_initial_codes_are_batch_vectors():
    q = EMAVectorQuantizer(num_codes=8, dim=3, decay=0.99).train()
    rows = torch.randn(64, 3)
    q._initialise(rows)
    assert all((code == rows).all(dim=1).any() for code in q.codebook)


def test_eval_mode_and_no_grad_leave_codebook_bit_identical():
    q = EMAVectorQuantizer(num_codes=16, dim=4)
    z = torch.randn(2, 4, 4, 4, 4)
    before = _buffers(q)
    q.eval()(z.requires_grad_())  # eval with gradients: no update, no initialisation
    q.train()
    with torch.no_grad():
        q(z)  # training mode but no grad (MONAI's EMAQuantizer would update here)
    q.quantize_nearest(z)
    after = _buffers(q)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not bool(q.initialized)
    q(z)  # a real training step does change it
    assert bool(q.initialized) and not torch.equal(before["codebook"], q.codebook)


def test_straight_through_gradient_and_lookup():
    q = EMAVectorQuantizer(num_codes=16, dim=4, commitment=0.0).train()
    z = torch.randn(2, 4, 3, 3, 3, requires_grad=True)
    z_q, loss, info = q(z)
    weight = torch.randn_like(z_q)
    (z_q * weight).sum().backward()
    assert torch.allclose(z.grad, weight)  # the decoder's gradient passes through unchanged
    q.eval()
    with torch.no_grad():
        z_q, _, info = q(z)
    assert torch.equal(q.lookup(info["indices"]), z_q)  # exact code vectors without a graph
    assert torch.equal(q.quantize_nearest(z), z_q)


def test_perplexity_and_usage():
    q = EMAVectorQuantizer(num_codes=4, dim=2).eval()
    _set_codebook(q, [[0, 0], [10, 0], [0, 10], [10, 10]])
    _, _, info = q(_as_map([[0, 0.1]] * 6))
    assert info["perplexity"].item() == pytest.approx(1.0)
    assert info["usage"].item() == pytest.approx(0.25)
    _, _, info = q(_as_map([[0, 0], [10, 0], [0, 10], [10, 10]] * 2))
    assert info["perplexity"].item() == pytest.approx(4.0)
    assert info["usage"].item() == pytest.approx(1.0)
    assert info["indices"].shape == (1, 8, 1, 1)


def test_chunked_nearest_code_matches_brute_force(monkeypatch):
    monkeypatch.setattr(quantizer_module, "_DISTANCE_BUDGET", 64)  # 2 rows per chunk
    q = EMAVectorQuantizer(num_codes=32, dim=3)
    flat = torch.randn(101, 3)
    assert torch.equal(q._nearest(flat), torch.cdist(flat, q.codebook).argmin(1))
    lo, hi = q.codebook_range()
    assert lo == q.codebook.min().item() and hi == q.codebook.max().item()


def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(100 + rank)  # different data and RNG on each rank
    q = EMAVectorQuantizer(num_codes=16, dim=3, decay=0.9).train()
    for _ in range(3):
        q(torch.randn(1, 3, 3, 3, 3) + rank)
    torch.save(q.state_dict(), f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_codebooks_stay_identical_across_ddp_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert bool(a["initialized"]) and a["cluster_size"].sum() > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key
