"""Networks of the adversarial systems: VQGAN's PatchGAN discriminator and a DCGAN generator / critic.

- :class:`PatchDiscriminator`: the N-layer PatchGAN of pix2pix (Isola et al. 2017, §3.2.2) that VQGAN and LDM train
  against their decoders: stride-2 4×4 convolutions, one logit per overlapping patch, so it judges local texture.
- :class:`DCGANGenerator` / :class:`DCGANDiscriminator`: Radford et al. 2016's all-convolutional pair (transposed
  convolutions with BatchNorm and ReLU in the generator; stride-2 convolutions with LeakyReLU 0.2 in the critic).
  The critic has no BatchNorm (``norm="layer"`` by default) so WGAN-GP's per-sample gradient penalty stays
  well defined (Gulrajani et al. 2017, §4).
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["DCGANDiscriminator", "DCGANGenerator", "PatchDiscriminator"]


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels // 4) or 1, channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown normalisation '{kind}'; choose batch, group, layer or none")


class PatchDiscriminator(nn.Module):
    """``layers`` stride-2 4×4 convolutions (width doubling up to 8×), one stride-1 block, a 1-channel logit map."""

    def __init__(self, in_channels: int = 3, width: int = 64, layers: int = 3, norm: str = "group"):
        super().__init__()
        self.layers = layers
        mods: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = width
        for i in range(1, layers + 1):
            c_out = width * min(2**i, 8)
            mods += [nn.Conv2d(c, c_out, 4, 2 if i < layers else 1, 1), _norm(norm, c_out), nn.LeakyReLU(0.2)]
            c = c_out
        mods.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)

    def output_size(self, size: int) -> int:
        """The side of the logit map for inputs of side ``size`` (4×4 kernels, padding 1)."""
        for stride in [2] * self.layers + [1, 1]:
            size = (size + 2 - 4) // stride + 1
        return size

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class DCGANGenerator(nn.Module):
    """z ∈ R^d → a linear map to (4w, H/4, W/4), two ×2 transposed-convolution blocks, tanh to [−1, 1]."""

    def __init__(self, image_shape: tuple[int, int, int], z_dim: int = 64, width: int = 64):
        super().__init__()
        c, h, w = image_shape
        if h % 4 or w % 4:
            raise ValueError(f"the DCGAN generator needs sides divisible by 4, got {h}×{w}")
        self.z_dim, self.start = z_dim, (4 * width, h // 4, w // 4)
        self.fc = nn.Sequential(nn.Linear(z_dim, 4 * width * (h // 4) * (w // 4)), nn.ReLU())
        self.net = nn.Sequential(
            nn.BatchNorm2d(4 * width),
            nn.ConvTranspose2d(4 * width, 2 * width, 4, 2, 1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, c, 3, 1, 1),
            nn.Tanh(),
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.net(self.fc(z).view(len(z), *self.start))


class DCGANDiscriminator(nn.Module):
    """Two stride-2 convolutions with LeakyReLU, a linear map to one logit (a WGAN critic's score)."""

    def __init__(self, image_shape: tuple[int, int, int], width: int = 64, norm: str = "layer"):
        super().__init__()
        c, h, w = image_shape
        self.net = nn.Sequential(
            nn.Conv2d(c, width, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1),
            _norm(norm, 2 * width),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
            nn.Linear(2 * width * (h // 4) * (w // 4), 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(1)
