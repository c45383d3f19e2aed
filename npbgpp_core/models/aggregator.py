"""View-dependent aggregation of per-view point features (NPBG++).

Per point only running sums over the views that see it are kept (count N, sum x,
sum y, sum x x^T, sum x y^T), so memory is constant in the number of views and views
may stream in any order or grouping. ``finish`` solves the ridge regression

    ym   = sum y / N
    beta = (sum xx^T / N + (alpha / N) I)^-1 (sum xy^T / N - (sum x / N) ym^T)

per point (beta = 0 for a single view); the descriptor for a view direction d is
``ym + beta^T x(d)`` with x the learnable basis MLP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

EMBED_FREQUENCIES = (1.0, 2.0, 4.0)


def embed_directions(d: torch.Tensor) -> torch.Tensor:
    """(M, 3) unit directions -> (M, 18): sin and cos of d_i * (pi/2) * {1, 2, 4}."""
    scaled = torch.cat([d * (math.pi / 2 * f) for f in EMBED_FREQUENCIES], dim=1)
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1)


class BasisMLP(nn.Module):
    """Direction embedding (18) -> 16 -> 16 -> basis_dim, LeakyReLU between layers."""

    def __init__(self, basis_dim: int = 6, hidden: int = 16) -> None:
        super().__init__()
        n_in = 6 * len(EMBED_FREQUENCIES)
        self.net = nn.Sequential(
            nn.Linear(n_in, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, basis_dim),
        )

    def forward(self, directions: torch.Tensor) -> torch.Tensor:
        return self.net(embed_directions(directions))


@dataclass
class AggregatedScene:
    """Result of aggregation: ``points`` (N, 3), ``coefficients`` (N, R, C) with rows
    [ym; beta_1..beta_m] (R = 1 + m) or [ym] for the mean variant, ``valid`` (N,) bool
    (seen by at least one view), ``counts`` (N,) number of views that saw each point,
    ``background`` the environment map (C + 1, rows, 2 rows) of a model with
    ``background='environment'`` (see :mod:`.background`), else None."""

    points: torch.Tensor
    coefficients: torch.Tensor
    valid: torch.Tensor
    counts: torch.Tensor | None = None
    background: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> AggregatedScene:
        return AggregatedScene(
            self.points.to(device), self.coefficients.to(device), self.valid.to(device),
            None if self.counts is None else self.counts.to(device),
            None if self.background is None else self.background.to(device),
        )

    def detach(self) -> AggregatedScene:
        return AggregatedScene(self.points, self.coefficients.detach(), self.valid, self.counts,
                               None if self.background is None else self.background.detach())

    def __len__(self) -> int:
        return int(self.points.shape[0])


class RunningSums:
    """Per-point sufficient statistics; ``add`` is differentiable (out-of-place index_add)."""

    def __init__(self, n: int, feature_dim: int, basis_dim: int | None, device: torch.device, dtype=torch.float32):
        self.n = n
        self.basis_dim = basis_dim
        self._tracked = False  # True once a differentiable sample was added
        self.count = torch.zeros(n, device=device, dtype=dtype)
        self.sum_y = torch.zeros(n, feature_dim, device=device, dtype=dtype)
        if basis_dim is not None:
            self.sum_x = torch.zeros(n, basis_dim, device=device, dtype=dtype)
            self.sum_xx = torch.zeros(n, basis_dim, basis_dim, device=device, dtype=dtype)
            self.sum_xy = torch.zeros(n, basis_dim, feature_dim, device=device, dtype=dtype)

    def add(self, index: torch.Tensor, y: torch.Tensor, x: torch.Tensor | None) -> None:
        """Accumulate samples ``y`` (M, C) (and basis values ``x`` (M, m)) of points ``index``."""
        if index.numel() == 0:
            return
        y = y.to(self.sum_y.dtype)
        if x is not None:
            x = x.to(self.sum_y.dtype)
        # Out of place only when autograd needs it (in place avoids copying N-sized sums).
        grad = torch.is_grad_enabled() and (y.requires_grad or (x is not None and x.requires_grad) or self._tracked)
        self._tracked = grad

        def acc(total: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            return total.index_add(0, index, values) if grad else total.index_add_(0, index, values)

        self.count = self.count.index_add_(0, index, torch.ones_like(index, dtype=self.count.dtype))
        self.sum_y = acc(self.sum_y, y)
        if self.basis_dim is not None:
            assert x is not None
            self.sum_x = acc(self.sum_x, x)
            self.sum_xx = acc(self.sum_xx, x[:, :, None] * x[:, None, :])
            self.sum_xy = acc(self.sum_xy, x[:, :, None] * y[:, None, :])

    def solve(self, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Coefficients (N, R, C) and valid mask (N,)."""
        valid = self.count > 0
        n = self.count.clamp_min(1.0)
        ym = self.sum_y / n[:, None]
        if self.basis_dim is None:
            return ym[:, None, :], valid
        m = self.basis_dim
        beta = torch.zeros_like(self.sum_xy)
        multi = torch.nonzero(self.count > 1).squeeze(1)
        if multi.numel():
            nm = n[multi][:, None, None]
            mean_x = self.sum_x[multi] / nm[:, :, 0]
            eye = torch.eye(m, device=ym.device, dtype=ym.dtype)
            A = self.sum_xx[multi] / nm + (alpha / nm) * eye
            B = self.sum_xy[multi] / nm - mean_x[:, :, None] * ym[multi][:, None, :]
            beta = beta.index_put((multi,), torch.linalg.solve(A, B))
        return torch.cat([ym[:, None, :], beta], dim=1), valid


def descriptors_from_coefficients(coefficients: torch.Tensor, basis_values: torch.Tensor | None) -> torch.Tensor:
    """``ym + beta^T x``: coefficients (N, 1 + m, C), basis values (N, m) -> (N, C)."""
    ym = coefficients[:, 0]
    if coefficients.shape[1] == 1 or basis_values is None:
        return ym
    beta = coefficients[:, 1:]
    x = basis_values.to(beta.dtype)
    if torch.is_grad_enabled():
        return ym + torch.einsum("nk,nkc->nc", x, beta)
    # Inference: one multiply-sum with [1, x] (faster than batched 1x6 @ 6xC products).
    homogeneous = torch.cat([x.new_ones(x.shape[0], 1), x], dim=1)
    return (coefficients * homogeneous[:, :, None]).sum(1)
