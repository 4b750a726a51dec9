"""DDPM (Ho et al. 2020): a linear noise schedule, an ε-prediction network, the
reweighted variational bound, ancestral sampling.

Two ε-networks: a small convolutional one for images, and for point sets (molecular
conformations: n points in 3-D) an MLP made equivariant by augmentation — every
training batch is randomly rotated and centred, so the network learns a rotation-
invariant density, as E(3)-aware models build in."""
from __future__ import annotations

import math

import torch
from torch import nn


def schedule(steps: int, beta_start: float = 1e-4, beta_end: float = 0.02):
    """β_t (linear, rescaled to `steps` as in improved DDPM), α_t, ᾱ_t."""
    scale = 1000 / steps
    betas = torch.linspace(scale * beta_start, min(scale * beta_end, 0.999), steps,
                           dtype=torch.float64)
    alphas = 1 - betas
    return betas.float(), alphas.float(), torch.cumprod(alphas, 0).float()


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32,
                                                      device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ImageEps(nn.Module):
    def __init__(self, channels: int, width: int, steps: int):
        super().__init__()
        self.architecture = {"kind": "images", "channels": channels, "width": width,
                             "steps": steps}
        self.width = width
        self.embed = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.blocks = nn.ModuleList([nn.Conv2d(width, width, 3, padding=1) for _ in range(4)])
        self.norms = nn.ModuleList([nn.GroupNorm(8, width) for _ in range(4)])
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        e = self.embed(time_embedding(t, self.width))[:, :, None, None]
        h = self.inp(x)
        for conv, norm in zip(self.blocks, self.norms):
            h = h + conv(nn.functional.silu(norm(h + e)))
        return self.out(nn.functional.silu(h))


class PointEps(nn.Module):
    def __init__(self, points: int, width: int, steps: int):
        super().__init__()
        self.architecture = {"kind": "points", "points": points, "width": width,
                             "steps": steps}
        self.width = width
        self.net = nn.Sequential(nn.Linear(points * 3 + width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, points * 3))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x.flatten(1), time_embedding(t, self.width)], dim=1)
        return self.net(h).view_as(x)


def build(architecture: dict) -> nn.Module:
    a = dict(architecture)
    kind = a.pop("kind")
    return ImageEps(**a) if kind == "images" else PointEps(**a)


def random_rotations(n: int, generator: torch.Generator) -> torch.Tensor:
    """n uniformly random 3-D rotation matrices (QR of Gaussian matrices, sign-fixed)."""
    q, r = torch.linalg.qr(torch.randn(n, 3, 3, generator=generator))
    q = q * torch.sign(torch.diagonal(r, dim1=1, dim2=2))[:, None, :]
    flip = torch.det(q) < 0
    q[flip, :, 0] = -q[flip, :, 0]
    return q


def eps_loss(net: nn.Module, x0: torch.Tensor, generator: torch.Generator,
             alpha_bar: torch.Tensor, augment_rotations: bool = False) -> torch.Tensor:
    """L_simple averaged over the batch (eps_losses)."""
    return eps_losses(net, x0, generator, alpha_bar, augment_rotations).mean()


def eps_losses(net: nn.Module, x0: torch.Tensor, generator: torch.Generator,
               alpha_bar: torch.Tensor, augment_rotations: bool = False) -> torch.Tensor:
    """L_simple: E_t,ε ‖ε − ε_θ(√ᾱ_t x₀ + √(1−ᾱ_t) ε, t)‖² per example (the variational
    bound with Ho et al.'s reweighting), summed over coordinates: one value per example."""
    # Draws come from the CPU generator (reproducible), then move to the data's device.
    if augment_rotations:
        x0 = x0 - x0.mean(dim=1, keepdim=True)
        x0 = x0 @ random_rotations(len(x0), generator).to(x0.device).transpose(1, 2)
    t = torch.randint(0, len(alpha_bar), (len(x0),), generator=generator)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    a = alpha_bar[t].to(x0.device).view(-1, *[1] * (x0.dim() - 1))
    t = t.to(x0.device)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    return (net(xt, t) - eps).pow(2).flatten(1).sum(dim=1)


@torch.no_grad()
def ancestral_sample(net: nn.Module, shape: tuple[int, ...], generator: torch.Generator
                     ) -> torch.Tensor:
    """x_T ~ N(0, I), then x_{t-1} = (x_t − β_t/√(1−ᾱ_t) ε_θ)/√α_t + √β_t z."""
    # Draws come from the CPU generator (reproducible on any device), then move to the
    # network's device.
    device = next(net.parameters()).device
    betas, alphas, alpha_bar = schedule(net.architecture["steps"])
    x = torch.randn(shape, generator=generator).to(device)
    for t in reversed(range(len(betas))):
        eps = net(x, torch.full((shape[0],), t, dtype=torch.long, device=device))
        x = (x - betas[t] / (1 - alpha_bar[t]).sqrt() * eps) / alphas[t].sqrt()
        if t > 0:
            x = x + betas[t].sqrt() * torch.randn(shape, generator=generator).to(device)
    return x
