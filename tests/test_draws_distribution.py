"""The step's random draws over many steps, eager and compiled, follow the distributions the algorithm
names.

Per-step parity tests feed both implementations the same draws, so they cannot see a draw that is wrong
in distribution: an index draw that favours some rows, a noise level off its log-logistic law, the
compiled path's generator (inductor's own RNG) drawing other numbers than eager. Here 200 steps' draws of
3 agents are tested against the laws themselves: a chi-square test of the batch rows' uniformity,
Kolmogorov-Smirnov tests of the noise levels against the truncated log-logistic CDF and of the noises
against N(0, 1), independence between agents, and between the draws of one step. With 51,200 rows per
law, a bias of about 1% of the CDF or of a row's frequency gives p far below the 1e-3 threshold; the seed
is fixed, so the test is deterministic.
"""
import numpy as np
import pytest
import torch

from dtql_fast import compiling, edm
from dtql_fast.draws import sample_draws

st = pytest.importorskip("scipy.stats")
N_ROWS, B, A, AGENTS, STEPS = 1000, 256, 6, 3, 200


def _sigma_cdf(x):
    u = 1.0 / (1.0 + np.exp(-(np.log(x) - edm.P_LOC) / edm.P_SCALE))
    return np.clip((u - edm.U_LO) / (edm.U_HI - edm.U_LO), 0.0, 1.0)


def _draw():
    return sample_draws(N_ROWS, B, A, 1, groups=AGENTS).tensors()


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_draws_follow_their_laws_over_many_steps(mode):
    torch.manual_seed(0)
    # compiled as a run compiles its step (compiling.CompileOnFirstCall: on a CPU, inductor's C++ wrapper)
    fn = _draw if mode == "eager" else compiling.CompileOnFirstCall(_draw, torch.device("cpu"))
    steps = [fn() for _ in range(STEPS)]
    idx, sigma_bc, noise_bc, eps, sigma_tr, noise_tr = (torch.stack([s[i] for s in steps]) for i in range(6))
    assert st.chisquare(np.bincount(idx.flatten().numpy(), minlength=N_ROWS)).pvalue > 1e-3
    for sigma in (sigma_bc, sigma_tr):
        s = sigma.double().flatten().numpy()
        assert edm.SIGMA_MIN <= s.min() and s.max() <= edm.SIGMA_MAX
        assert st.kstest(s, _sigma_cdf).pvalue > 1e-3
    for noise in (noise_bc, eps, noise_tr):
        assert st.kstest(noise.flatten().numpy(), "norm").pvalue > 1e-3
    # each agent its own stream: agent 0's and agent 1's noises uncorrelated, their batches different
    a0, a1 = noise_bc[:, 0].flatten().numpy(), noise_bc[:, 1].flatten().numpy()
    assert abs(np.corrcoef(a0, a1)[0, 1]) < 4 / np.sqrt(a0.size)
    assert (idx[:, 0] != idx[:, 1]).float().mean() > 0.99
    # the draws of one step independent of each other: a compiled graph that gave two random ops one seed
    # would pass every test of a single law above
    def corr(x, y):
        x, y = x.double().flatten().numpy(), y.double().flatten().numpy()
        return abs(np.corrcoef(x, y)[0, 1]), 4 / np.sqrt(x.size)
    for x, y in ((noise_bc, noise_tr), (noise_bc[..., 0, :], eps), (eps, noise_tr[..., 0, :]),
                 (torch.log(sigma_bc), torch.log(sigma_tr)), (idx.double(), torch.log(sigma_bc[..., 0]))):
        r, bound = corr(x, y)
        assert r < bound, (r, bound)
    # consecutive steps independent: the bc noise levels of step t and t + 1 uncorrelated
    ls = torch.log(sigma_bc[:, 0, :, 0]).double().numpy()
    assert abs(np.corrcoef(ls[:-1].flatten(), ls[1:].flatten())[0, 1]) < 4 / np.sqrt(ls[:-1].size)
