"""2-D toy distributions (the usual test beds of flow and diffusion papers), as datasets of (x, label)."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..core.mixture import GaussianMixture

__all__ = ["TOYS", "ToyDataset", "make_toy"]


def _moons(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    y = torch.randint(0, 2, (n,), generator=g)
    theta = torch.rand(n, generator=g) * math.pi
    x = torch.stack([torch.cos(theta), torch.sin(theta)], 1)
    x = torch.where(y[:, None] == 1, torch.stack([1 - x[:, 0], 0.5 - x[:, 1]], 1), x)
    x = x + 0.05 * torch.randn(n, 2, generator=g)
    return (x - torch.tensor([0.5, 0.25])) * 1.5, y


def _eight_gaussians(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    y = torch.randint(0, 8, (n,), generator=g)
    ang = y.float() * (2 * math.pi / 8)
    return 2.0 * torch.stack([ang.cos(), ang.sin()], 1) + 0.1 * torch.randn(n, 2, generator=g), y


def _checkerboard(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    x1 = torch.rand(n, generator=g) * 4 - 2
    x2 = torch.rand(n, generator=g) - torch.randint(0, 2, (n,), generator=g).float() * 2
    x2 = x2 + (torch.floor(x1) % 2)
    return torch.stack([x1, x2], 1), torch.full((n,), -1)


def _swiss_roll(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g))
    x = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1) / 5 + 0.1 * torch.randn(n, 2, generator=g)
    return x, torch.full((n,), -1)


def _spirals(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    y = torch.randint(0, 2, (n,), generator=g)
    t = torch.sqrt(torch.rand(n, generator=g)) * 3 * math.pi
    sign = 1 - 2 * y.float()
    x = sign[:, None] * torch.stack([t * torch.cos(t), t * torch.sin(t)], 1) / 4
    return x + 0.08 * torch.randn(n, 2, generator=g), y


def _mixture(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    x, y = GaussianMixture.grid_2d(3, 1.0, 0.1).sample(n, g)
    return x.float(), y


TOYS = {
    "moons": _moons,
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "swissroll": _swiss_roll,
    "spirals": _spirals,
    "mixture": _mixture,
}


def make_toy(name: str, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """n points (float32, (n, 2)) and labels (-1 where the toy has none) of a named toy."""
    if name not in TOYS:
        raise ValueError(f"unknown toy dataset '{name}'; choose one of {sorted(TOYS)}")
    return TOYS[name](n, torch.Generator().manual_seed(seed))


class ToyDataset(Dataset):
    """A fixed sample of a 2-D toy: items are (x ∈ R², label)."""

    def __init__(self, name: str, n: int = 20000, seed: int = 0):
        self.x, self.y = make_toy(name, n, seed)
        self.num_classes = int(self.y.max()) + 1 if int(self.y.max()) >= 0 else 0
        self.shape = (2,)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.x[i], int(self.y[i])
