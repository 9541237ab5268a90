"""RegMean++'s block-by-block loop (``merging.regmean_plusplus``) on the two-layer tanh network of
``../shared/specs/data-aware.md`` §5, in float64, against RegMean and an independent lstsq."""

import numpy as np
import torch
from torch import nn

from merging.methods.regmean import RegmeanParams, regmean_delta
from merging.regmean_plusplus import regmean_plusplus

F64 = torch.float64
W0 = torch.tensor([[.5, -.2, .1], [.3, .4, -.6]], dtype=F64)
D = (torch.tensor([[.2, 0, -.1], [.1, -.3, .2]], dtype=F64), torch.tensor([[-.1, .3, .2], [0, .2, -.4]], dtype=F64))
A0 = torch.tensor([[.5, -.2, .1], [.3, .4, -.6], [-.1, .2, .3]], dtype=F64)
E = (torch.tensor([[.3, 0, -.2], [0, .2, .1], [.1, -.1, 0]], dtype=F64),
     torch.tensor([[-.2, .1, 0], [.2, -.1, .3], [0, .3, -.2]], dtype=F64))
X = (torch.tensor([[1, 0, 2], [0, 1, 1], [2, 1, 0], [1, -1, 1]], dtype=F64),
     torch.tensor([[0, 2, 1], [1, 1, -1], [-1, 0, 2], [3, 1, 1]], dtype=F64))


def net(a: torch.Tensor, w: torch.Tensor) -> list[nn.Module]:
    first, second = nn.Linear(3, 3, bias=False, dtype=F64), nn.Linear(3, 2, bias=False, dtype=F64)
    with torch.no_grad():
        first.weight.copy_(a)
        second.weight.copy_(w)
    return [nn.Sequential(first, nn.Tanh()), second]


def test_spec_tanh_example():
    """spec §5 RegMean++ (a = 1): A* as RegMean's, layer 2 from tanh(A* X_i)."""
    merged = net(A0, W0)
    candidates = [net(A0 + E[i], W0 + D[i]) for i in range(2)]
    grams = regmean_plusplus(merged, candidates, [[X[0]], [X[1]]], [[None], [None]],
                             lambda layer, name: (RegmeanParams(alpha=1.0), [1.0, 1.0]))
    a_star = torch.tensor([[0.454286, -0.162857, 0.0971429], [0.385587, 0.472127, -0.43854],
                           [-0.0175873, 0.303873, 0.22654]], dtype=F64)
    layer2 = torch.tensor([[0.61613, -0.0577838, 0.223507], [0.522303, 0.363361, -0.788835]], dtype=F64)
    assert torch.allclose(merged[0][0].weight, a_star, atol=5e-6)
    assert torch.allclose(merged[1].weight, layer2, atol=5e-6)
    # layer 2's Grams are those of tanh(A* X_i), not of tanh(A_i X_i) (plain RegMean's)
    hidden = [torch.tanh(x @ a_star.T) for x in X]
    assert torch.allclose(grams[1][0].grams["weight"], hidden[0].T @ hidden[0] / 4, atol=5e-6)
    plain = [torch.tanh(x @ (A0 + e).T) for x, e in zip(X, E)]
    regmean = W0 + regmean_delta(torch.stack(D), torch.stack([h.T @ h / 4 for h in plain]), torch.ones(2, dtype=F64), 1.0)
    assert torch.allclose(regmean, torch.tensor([[0.632815, -0.0454387, 0.283192], [0.530404, 0.282434, -0.691345]],
                                                dtype=F64), atol=5e-6)
    # independent: least squares over tanh(A* X_i) with targets W_i h
    h = torch.tanh(torch.cat(X) @ merged[0][0].weight.detach().T).numpy()
    targets = np.vstack([h[:4] @ (W0 + D[0]).numpy().T, h[4:] @ (W0 + D[1]).numpy().T])
    solution, *_ = np.linalg.lstsq(h, targets, rcond=None)
    assert np.allclose(merged[1].weight.detach().numpy(), solution.T, atol=1e-12)
