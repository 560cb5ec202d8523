import pytest
import torch
import torch.nn.functional as F

from medlsdm.diffusion.objective import diffusion_loss, drop_condition
from medlsdm.diffusion.schedules import NoiseSchedule
from medlsdm.errors import ConfigError
from medlsdm.models.denoisers import SemanticUNet


def test_condition_dropout_is_per_sample():
    cond = torch.rand(64, 3, 2, 2, 2) + 0.1
    dropped, mask = drop_condition(cond, 0.5, generator=torch.Generator().manual_seed(0))
    assert 10 < int(mask.sum()) < 54                              # some samples dropped, not all
    assert not dropped[mask].any()                                 # dropped samples are all-zero
    torch.testing.assert_close(dropped[~mask], cond[~mask])        # the others are untouched
    assert not drop_condition(cond, 0.0)[1].any() and drop_condition(cond, 1.0)[1].all()
    with pytest.raises(ConfigError, match="cond_drop_prob"):
        drop_condition(cond, 1.5)


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
def test_perfect_model_has_zero_loss_and_targets_match(prediction):
    sched = NoiseSchedule(100)
    x0 = torch.randn(4, 1, 2, 4, 4)
    noise, t = torch.randn_like(x0), torch.tensor([0, 10, 50, 99])

    def oracle(x_t, t_model, cond):
        torch.testing.assert_close(x_t, sched.q_sample(x0, t, noise))
        return sched.target(x0, noise, t_model, prediction)

    assert diffusion_loss(oracle, x0, None, sched, prediction=prediction, t=t, noise=noise).item() == pytest.approx(0, abs=1e-6)


def test_loss_kinds_and_seeding():
    sched = NoiseSchedule(100)
    x0 = torch.randn(4, 1, 2, 4, 4)

    def zero(x_t, t, cond):
        return torch.zeros_like(x_t)

    assert diffusion_loss(zero, x0, None, sched, prediction="x0", loss="l1").item() == pytest.approx(x0.abs().mean().item())
    assert diffusion_loss(zero, x0, None, sched, prediction="x0", loss="l2").item() == pytest.approx(x0.square().mean().item())

    def noisy(x_t, t, cond):
        return x_t

    a = diffusion_loss(noisy, x0, None, sched, generator=torch.Generator().manual_seed(5))
    b = diffusion_loss(noisy, x0, None, sched, generator=torch.Generator().manual_seed(5))
    assert a.item() == b.item()
    with pytest.raises(ConfigError, match="loss"):
        diffusion_loss(zero, x0, None, sched, loss="huber")


def _toy_batch(n, gen):
    """Label maps with a random 6x6 foreground box; the 'latent' is the box at half resolution
    in [-1, 1], so the image is determined by the label map."""
    lab = torch.zeros(n, 4, 16, 16, dtype=torch.long)
    for i in range(n):
        h0, w0 = torch.randint(0, 10, (2,), generator=gen).tolist()
        lab[i, :, h0:h0 + 6, w0:w0 + 6] = 1
    onehot = F.one_hot(lab, 2).permute(0, 4, 1, 2, 3).float()
    return F.avg_pool3d(onehot[:, 1:], (1, 2, 2)) * 2 - 1, onehot


def _train(cond_drop_prob, seed=0, steps=60):
    torch.manual_seed(seed)
    net = SemanticUNet(1, num_classes=2, base_channels=8, channel_mult=(1, 2), attention_levels=(),
                       label_channels=8, label_hidden=(8,), label_downsample=(1, 2, 2), spade_hidden=8,
                       depth_attention=False)
    sched = NoiseSchedule(100)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x0, onehot = _toy_batch(8, gen)
        loss = diffusion_loss(net, x0, onehot, sched, loss="l2", cond_drop_prob=cond_drop_prob, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval(), sched


@torch.no_grad()
def _eval_losses(net, sched):
    """L2 eps-loss of the conditional and the null branch on held-out data at fixed t and noise."""
    gen = torch.Generator().manual_seed(99)
    x0, onehot = _toy_batch(32, gen)
    t, noise = torch.tensor([20, 40, 60, 80] * 8), torch.randn(x0.shape, generator=gen)
    kw = dict(loss="l2", cond_drop_prob=0.0, t=t, noise=noise)
    cond = diffusion_loss(net, x0, onehot, sched, **kw).item()
    null = diffusion_loss(net, x0, torch.zeros_like(onehot), sched, **kw).item()
    x_t = sched.q_sample(x0, t, noise)
    differ = (net(x_t, t, onehot) - net(x_t, t, torch.zeros_like(onehot))).abs().mean().item()
    return cond, null, differ


def test_condition_dropout_trains_the_null_branch():
    net, sched = _train(cond_drop_prob=0.5)
    cond, null, differ = _eval_losses(net, sched)
    assert differ > 0.01                      # the condition matters...
    assert cond < 0.9 * null                  # ...and helps: the label map determines the image
    # Without dropout the null branch is never trained (the reference's defect): its loss is
    # clearly worse than that of the null branch trained by dropout.
    _, null_untrained, _ = _eval_losses(*_train(cond_drop_prob=0.0))
    assert null < 0.8 * null_untrained
