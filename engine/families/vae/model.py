"""The seed paper's VAE (App. D), sized by the study: a convolutional encoder with one
stride-2 layer per entry of `widths` (the paper: 32, 64, 128, 256, 512 on 64×64
images), two MLP layers to the Gaussian latent's mean and log-variance, and a mirrored
decoder. `kind: ae` drops the KL term and the noise: a plain autoencoder."""
from __future__ import annotations

import torch
from torch import nn


class ConvVAE(nn.Module):
    def __init__(self, channels: int, image_size: int, widths: list[int], latent: int,
                 hidden: int, kind: str = "vae"):
        super().__init__()
        self.architecture = {"channels": channels, "image_size": image_size,
                             "widths": list(widths), "latent": latent, "hidden": hidden,
                             "kind": kind}
        self.kind, self.latent = kind, latent
        layers, c = [], channels
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.BatchNorm2d(w), nn.LeakyReLU()]
            c = w
        self.encoder = nn.Sequential(*layers)
        self.side = image_size // 2 ** len(widths)
        flat = widths[-1] * self.side * self.side
        self.to_hidden = nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.LeakyReLU())
        self.to_mean = nn.Linear(hidden, latent)
        self.to_logvar = nn.Linear(hidden, latent)
        self.from_latent = nn.Sequential(nn.Linear(latent, hidden), nn.LeakyReLU(),
                                         nn.Linear(hidden, flat), nn.LeakyReLU())
        up = []
        rev = list(reversed(widths))
        for a, b in zip(rev, rev[1:] + [rev[-1]]):
            up += [nn.ConvTranspose2d(a, b, 3, stride=2, padding=1, output_padding=1),
                   nn.BatchNorm2d(b), nn.LeakyReLU()]
        self.decoder = nn.Sequential(*up, nn.Conv2d(rev[-1], channels, 3, padding=1), nn.Sigmoid())
        self.widths = widths

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.to_hidden(self.encoder(x))
        return self.to_mean(h), self.to_logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.from_latent(z).view(-1, self.widths[-1], self.side, self.side)
        return self.decoder(h)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                threshold: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.losses(x, generator, threshold)

    def losses(self, x: torch.Tensor, generator: torch.Generator | None = None,
               threshold: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image: reconstruction error (binary cross-entropy summed over pixels, the
        Bernoulli likelihood of [0, 1] images) and KL to the N(0, I) prior (0 for the
        autoencoder). Their sum is the negative ELBO, the VAE's loss. `threshold` γ:
        truncated cross-entropy (ForTIFAI) on the reconstruction, pixel by pixel: a
        pixel whose likelihood exp(−BCE) the decoder already puts above γ adds nothing."""
        mean, logvar = self.encode(x)
        if self.kind == "ae":
            z, kl = mean, torch.zeros(len(x), device=x.device)
        else:
            # noise from the CPU generator (reproducible), then to the model's device
            eps = torch.randn(mean.shape, generator=generator).to(mean.device) \
                if generator is not None else torch.randn_like(mean)
            z = mean + eps * torch.exp(0.5 * logvar)
            kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=1)
        recon = nn.functional.binary_cross_entropy(self.decode(z), x, reduction="none")
        if threshold is not None:
            from engine.fit import truncated

            recon = truncated(recon, threshold)
        recon = recon.flatten(1).sum(dim=1)
        return recon, kl
