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
    """Linear autoregression plus a small MLP correction on standardized inputs.

    The linear path carries the bulk of a one-step-ahead forecast (a weighted recent history);
    the MLP learns the nonlinear parts (time-of-day and weather interactions, the congested
    branch, lighting switching at dusk).
    """

    x_mean: torch.Tensor
    x_std: torch.Tensor
    y_mean: torch.Tensor
    y_std: torch.Tensor

    def __init__(self, x_mean: torch.Tensor, x_std: torch.Tensor, y_mean: float, y_std: float,
                 *, hidden: int = 64, floor: float = 0.0, anchor: int | None = None) -> None:
        super().__init__()
        n_in = x_mean.numel()
        # With an anchor, the net forecasts the change from that input (the current value):
        # y = x[anchor] + correction, and y_mean / y_std describe the change.
        self.anchor = anchor
        self.register_buffer("x_mean", x_mean.reshape(1, n_in).float())
        self.register_buffer("x_std", x_std.reshape(1, n_in).float())
        self.register_buffer("y_mean", torch.tensor([[y_mean]], dtype=torch.float32))
        self.register_buffer("y_std", torch.tensor([[y_std]], dtype=torch.float32))
        self.floor = floor
        self.linear = nn.Linear(n_in, 1)
        self.mlp = nn.Sequential(
            nn.Linear(n_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, 1),
        )

    def standardized(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.x_mean) / self.x_std
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
                 *, hidden: int = 64, floor: float = 0.0, anchor: int | None = None) -> None:
        super().__init__(x_mean, x_std, y_mean, y_std, hidden=hidden, floor=floor, anchor=anchor)
        self.mlp = nn.Sequential(nn.Linear(x_mean.numel(), hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def standardized(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.mlp((x - self.x_mean) / self.x_std)
        return out


class TrafficGraph(nn.Module):  # type: ignore[misc, unused-ignore]
    """Exported traffic model: next-window mean speed and its congestion level (0, 1, 2)."""

    def __init__(self, net: Forecaster, free_flow_m_s: float, slowing_below: float,
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
