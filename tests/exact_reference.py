"""The exact answer and the round-off floor that the fp32 implementations are measured against
(tests only).

Adam's first steps move each weight by about lr * g / (|g| + 1e-8), so an element whose gradient
is at round-off level can end up anywhere within a fraction of lr, in the fp32 reference as much as
in the fast step. How far depends on the order in which the sums run, which differs between BLAS
kernels (AVX2 and AVX-512 builds of the same library sum in different orders). One fp32 reference
run is one sample of that: on one CPU it happened to land 1.2e-6 from float64 on a weight where
the fast step landed 2.2e-5, while here the same reference, fed its batch rows in other orders,
lands 2.3e-5 to 3.9e-5 from it (hopper's critic.q1.3.weight after two steps). So the floor is
measured on every run: the fp32 reference fed the same batches with their rows permuted is the
same step mathematically (every loss is a mean over rows) with other summation orders.
"""
import torch

from dtql_fast.draws import Draws
from dtql_fast.reference import ReferenceDTQL
from dtql_fast.transitions import Transitions

ORDERS = 4         # permuted fp32 reference runs, besides the agent's own fp32 run
FLOOR_FACTOR = 3   # a fast weight may be this many times the worst fp32 sample from float64


def _copy(agent, dtype):
    """A ReferenceDTQL in `dtype` holding `agent`'s weights (agent: reference or fast, one seed)."""
    torch.set_default_dtype(dtype)
    try:
        copy = ReferenceDTQL(agent.state_dim, agent.action_dim, agent.hyper)
    finally:
        torch.set_default_dtype(torch.float32)
    for k, m in copy.modules().items():
        m.load_state_dict({n: t.to(dtype) for n, t in agent.modules()[k].state_dict().items()})
    return copy


class Exact:
    """The reference in float64 from the same weights, fed the same draws: the exact answer
    the fp32 implementations are both measured against."""

    def __init__(self, ref):
        self.agent = _copy(ref, torch.float64)

    @staticmethod
    def _draws(d):
        return type(d)(*(t if t.dtype == torch.int64 else t.double() for t in d.tensors()))

    def _data(self, data):
        return Transitions(*(t.double() for t in (data.obs, data.actions, data.rewards, data.next_obs, data.not_done)))

    def train_step(self, data, d):
        return self.agent.train_step(self._data(data), self._draws(d))

    def pretrain_step(self, data, d):
        return self.agent.pretrain_step(self._data(data), self._draws(d))


class RoundOff:
    """The float64 reference and ORDERS fp32 references with their batch rows permuted, all from
    `agent`'s weights and fed the same draws. `check` bounds a weight's distance from float64."""

    def __init__(self, agent, orders: int = ORDERS, seed: int = 0):
        self.exact = Exact(agent)
        self.permuted = [_copy(agent, torch.float32) for _ in range(orders)]
        self._g = torch.Generator().manual_seed(seed)

    def _each(self, method, data, d):
        for agent in self.permuted:
            perm = torch.randperm(d.idx.shape[0], generator=self._g)
            getattr(agent, method)(data, Draws(*(t[perm] for t in d.tensors())))
        return getattr(self.exact, method)(data, d)

    def train_step(self, data, d):
        return self._each("train_step", data, d)

    def pretrain_step(self, data, d):
        return self._each("pretrain_step", data, d)

    def check(self, name: str, got: list, fp32: list, lr: float, label: str = ""):
        """Every tensor of module `name` (in parameters() order): `got` (the implementation under
        test) no farther from float64 than max(5% of one Adam step, FLOOR_FACTOR x the farthest
        fp32 sample: `fp32`, the run it is compared with, or a permuted reference)."""
        exact = list(self.exact.agent.modules()[name].named_parameters())
        samples = [list(fp32)] + [list(a.modules()[name].parameters()) for a in self.permuted]
        for i, (k, e) in enumerate(exact):
            e = e.detach()
            err = (got[i].detach().double() - e).abs().max().item()
            floor = max((s[i].detach().double() - e).abs().max().item() for s in samples)
            assert err <= max(0.05 * lr, FLOOR_FACTOR * floor), \
                f"{label}{name}.{k}: {err:.3g} from float64 (fp32 round-off reaches {floor:.3g})"
