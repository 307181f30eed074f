import math

import numpy as np
import pytest
import torch

from dtql_fast import edm


def test_preconditioning_hand_values():
    sigma = torch.tensor([0.5, 0.002, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in = edm.precondition(sigma)
    # sigma = sigma_data = 0.5: c_skip = 1/2, c_out = 0.25/sqrt(0.5), c_in = 1/sqrt(0.5)
    assert c_skip[0].item() == pytest.approx(0.5, rel=1e-12)
    assert c_out[0].item() == pytest.approx(0.25 / math.sqrt(0.5), rel=1e-12)
    assert c_in[0].item() == pytest.approx(1 / math.sqrt(0.5), rel=1e-12)
    # sigma = 80: c_skip = 0.25 / 6400.25, c_out = 40 / sqrt(6400.25), c_in = 1 / sqrt(6400.25)
    assert c_skip[2].item() == pytest.approx(0.25 / 6400.25, rel=1e-12)
    assert c_out[2].item() == pytest.approx(40 / math.sqrt(6400.25), rel=1e-12)
    assert c_in[2].item() == pytest.approx(1 / math.sqrt(6400.25), rel=1e-12)
    # lambda(sigma) = 1/c_out^2 = (sigma^2 + sd^2) / (sigma sd)^2
    lam = 1 / c_out[1] ** 2
    assert lam.item() == pytest.approx((0.002 ** 2 + 0.25) / (0.002 * 0.5) ** 2, rel=1e-12)


class _ConstNet(torch.nn.Module):
    """F = a fixed output, recording what it was fed."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x_in, s, t):
        self.seen = (x_in, s, t)
        return self.out


def test_edm_loss_hand_computed_with_clamp():
    x = torch.tensor([[0.9, -0.2]], dtype=torch.float64)
    s = torch.zeros(1, 3, dtype=torch.float64)
    sigma = torch.tensor([[0.5]], dtype=torch.float64)
    noise = torch.tensor([[[1.0, -1.0]]], dtype=torch.float64)
    Fout = torch.tensor([[3.0, 0.1]], dtype=torch.float64)
    net = _ConstNet(Fout)
    loss = edm.edm_loss(net, x, s, sigma, noise, max_action=1.0)
    # By hand: x_noisy = [1.4, -0.7]; c_in = 1/sqrt(.5); c_out = .25/sqrt(.5); c_skip = .5
    c_out = 0.25 / math.sqrt(0.5)
    x_in = np.array([1.4, -0.7]) / math.sqrt(0.5)
    np.testing.assert_allclose(net.seen[0].numpy()[0], x_in, rtol=1e-12)
    assert net.seen[2].item() == pytest.approx(math.log(0.5) / 4, rel=1e-12)
    D = np.array([c_out * 3.0 + 0.5 * 1.4, c_out * 0.1 + 0.5 * -0.7])
    D = np.clip(D, -1, 1)  # the first entry (1.76) is clamped to 1
    assert D[0] == 1.0
    expected = np.mean(((D - np.array([0.9, -0.2])) / c_out) ** 2)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # Unclamped (the toy tasks) differs:
    loss_free = edm.edm_loss(net, x, s, sigma, noise, max_action=None)
    D_free = np.array([c_out * 3.0 + 0.5 * 1.4, c_out * 0.1 + 0.5 * -0.7])
    assert loss_free.item() == pytest.approx(np.mean(((D_free - [0.9, -0.2]) / c_out) ** 2), rel=1e-12)


def test_edm_loss_k_levels_is_mean_over_all_entries():
    torch.manual_seed(1)
    B, K, A, S = 5, 3, 2, 4
    net = torch.nn.Linear(A + S + 1, A).double()
    f = lambda x_in, s, t: net(torch.cat([x_in, s, t[:, None]], 1))
    x = torch.rand(B, A, dtype=torch.float64) * 2 - 1
    s = torch.randn(B, S, dtype=torch.float64)
    sigma = edm.sample_sigma((B, K)).double()
    noise = torch.randn(B, K, A, dtype=torch.float64)
    lossK = edm.edm_loss(f, x, s, sigma, noise, 1.0)
    # K noise levels == the mean of K separate K=1 losses (equal sizes).
    per_level = [edm.edm_loss(f, x, s, sigma[:, k:k + 1], noise[:, k:k + 1], 1.0) for k in range(K)]
    assert lossK.item() == pytest.approx(torch.stack(per_level).mean().item(), rel=1e-12)


def test_sigma_draws_in_range_and_median_at_sigma_data():
    g = torch.Generator().manual_seed(0)
    sig = edm.sample_sigma((400_000,), generator=g)
    assert sig.dtype == torch.float32
    assert sig.min().item() >= edm.SIGMA_MIN * (1 - 1e-6)
    assert sig.max().item() <= edm.SIGMA_MAX * (1 + 1e-6)
    assert sig.median().item() == pytest.approx(edm.SIGMA_DATA, rel=0.01)
    # log-logistic with scale 0.5: P(sigma < sd * e^0.5) = sigmoid(1) (truncation is negligible)
    frac = (sig < edm.SIGMA_DATA * math.exp(0.5)).double().mean().item()
    assert frac == pytest.approx(1 / (1 + math.exp(-1)), abs=0.003)
    # The extremes of the range map to the truncation bounds.
    ends = edm.sigma_from_uniform(torch.tensor([edm.U_LO, edm.U_HI], dtype=torch.float64))
    np.testing.assert_allclose(ends.numpy(), [edm.SIGMA_MIN, edm.SIGMA_MAX], rtol=1e-5)
