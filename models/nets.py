"""The torch modules behind the shipped models (training only: imports torch).

Scaling is part of each module (registered buffers), so the exported graph takes raw inputs in
the manifest's units and returns outputs in their units.
"""

from __future__ import annotations

import torch
from torch import nn

# Where the train extra is missing (CI type-checks without torch), nn.Module is Any: hence
# the ignore comments on the class lines.


class Forecaster(nn.Module):  # type: ignore[misc, unused-ignore]
    """Linear autoregression plus an MLP correction on standardized features.

    The linear path carries the bulk of a one-step-ahead forecast (a weighted recent history);
    the MLP learns the nonlinear parts (time-of-day and weather interactions, the congested
    branch, lighting switching at dusk, charging sessions ending).

    Features are the inputs times a fixed ``mix`` matrix (the inputs themselves, then
    differences such as load now minus load a window back), each standardized over the
    training rows. A difference is a linear function of the inputs, but standardized on its
    own it is not buried under the spread of the levels: a charger's 11 kW dwarfs a taper of
    a few hundred watts per window, which is what the next window depends on.
    """

    mix: torch.Tensor
    x_mean: torch.Tensor
    x_std: torch.Tensor
    y_mean: torch.Tensor
    y_std: torch.Tensor

    def __init__(self, x_mean: torch.Tensor, x_std: torch.Tensor, y_mean: float, y_std: float,
                 *, hidden: int = 64, depth: int = 2, floor: float = 0.0,
                 anchor: int | None = None, mix: torch.Tensor | None = None) -> None:
        super().__init__()
        n_feat = x_mean.numel()
        # With an anchor, the net forecasts the change from that input (the current value):
        # y = x[anchor] + correction, and y_mean / y_std describe the change.
        self.anchor = anchor
        self.has_mix = mix is not None
        if mix is not None:
            self.register_buffer("mix", mix.float())
        self.register_buffer("x_mean", x_mean.reshape(1, n_feat).float())
        self.register_buffer("x_std", x_std.reshape(1, n_feat).float())
        self.register_buffer("y_mean", torch.tensor([[y_mean]], dtype=torch.float32))
        self.register_buffer("y_std", torch.tensor([[y_std]], dtype=torch.float32))
        self.floor = floor
        self.linear = nn.Linear(n_feat, 1)
        layers: list[nn.Module] = [nn.Linear(n_feat, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(hidden, 1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        f = x @ self.mix if self.has_mix else x
        return (f - self.x_mean) / self.x_std

    def standardized(self, x: torch.Tensor) -> torch.Tensor:
        z = self.features(x)
        out: torch.Tensor = self.linear(z) + self.mlp(z)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.standardized(x) * self.y_std + self.y_mean
        if self.anchor is not None:
            y = y + x[:, self.anchor : self.anchor + 1]
        return torch.clamp(y, min=self.floor)


class OriginalMLP(Forecaster):
    """The starting design: 4 inputs -> 64 ReLU -> 1, MSE, Adam (inputs standardized)."""

    def __init__(self, x_mean: torch.Tensor, x_std: torch.Tensor, y_mean: float, y_std: float,
                 *, hidden: int = 64, depth: int = 1, floor: float = 0.0,
                 anchor: int | None = None, mix: torch.Tensor | None = None) -> None:
        super().__init__(x_mean, x_std, y_mean, y_std, hidden=hidden, floor=floor, anchor=anchor)
        self.mlp = nn.Sequential(nn.Linear(x_mean.numel(), hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def standardized(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.mlp((x - self.x_mean) / self.x_std)
        return out


class TreeEnsemble(nn.Module):  # type: ignore[misc, unused-ignore]
    """``models.trees.LeafTables`` as a module: one Gather per path level (so the graph needs
    no Reshape), then Mul, Greater, Cast and one MatMul over the leaves."""

    sign: torch.Tensor
    threshold: torch.Tensor
    value: torch.Tensor

    def __init__(self, index: torch.Tensor, sign: torch.Tensor, threshold: torch.Tensor,
                 value: torch.Tensor, base: float) -> None:
        super().__init__()
        self.levels = int(index.shape[0])
        for k in range(self.levels):
            self.register_buffer(f"index{k}", index[k].long())
        self.register_buffer("sign", sign.float())
        self.register_buffer("threshold", threshold.float())
        self.register_buffer("value", value.float().reshape(-1, 1))
        self.base = float(base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        on: torch.Tensor | None = None
        for k in range(self.levels):
            cond = (x.index_select(1, getattr(self, f"index{k}")) * self.sign[k]
                    > self.threshold[k]).float()
            on = cond if on is None else on * cond
        assert on is not None
        out: torch.Tensor = on @ self.value + self.base
        return out


class Blend(nn.Module):  # type: ignore[misc, unused-ignore]
    """The mean of the net's forecast and the trees' (which forecast the change from the
    ``anchor`` input): two learners whose errors differ, on a history too short for either."""

    def __init__(self, net: Forecaster, trees: TreeEnsemble, anchor: int) -> None:
        super().__init__()
        self.net = net
        self.trees = trees
        self.anchor = anchor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tree = x[:, self.anchor : self.anchor + 1] + self.trees(x)
        out: torch.Tensor = 0.5 * self.net(x) + 0.5 * torch.clamp(tree, min=self.net.floor)
        return out


class TrafficGraph(nn.Module):  # type: ignore[misc, unused-ignore]
    """Exported traffic model: next-window mean speed and its congestion level (0, 1, 2)."""

    def __init__(self, net: Forecaster | Blend, free_flow_m_s: float, slowing_below: float,
                 congested_below: float) -> None:
        super().__init__()
        self.net = net
        self.slow_m_s = float(free_flow_m_s * slowing_below)
        self.congested_m_s = float(free_flow_m_s * congested_below)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        speed = self.net(features)
        level = (speed < self.slow_m_s).float() + (speed < self.congested_m_s).float()
        return speed, level


class EnergyGraph(nn.Module):  # type: ignore[misc, unused-ignore]
    """Exported energy model: next-window mean load."""

    def __init__(self, net: Forecaster) -> None:
        super().__init__()
        self.net = net

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(features)
        return out
