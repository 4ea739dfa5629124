"""Pack all-MiniLM-L6-v2 small enough to travel to the GPU machine beside the FID Inception weights (64 MiB a call).

The GPU machine has no network and no copy of the model. ``pack`` (here) keeps the word-embedding rows of the
tokens the captioned-shapes grammar uses (every other row is never read by its captions), the first 64 position
embeddings (captions are cut at 32 tokens), rounds each weight matrix of the transformer to 8 bits per row
(symmetric, scale max|w|/127) and the rest to fp16: about 11 MB instead of 91. ``unpack`` (there) writes an
ordinary ``save_pretrained`` folder in fp32 that ``text.encoder`` can name. The packed encoder is all-MiniLM-L6-v2
up to that rounding; training and evaluation on the GPU both use it, so the benchmark is self-consistent.

    python benchmarks/carry_text_encoder.py pack .carry/minilm_pack
    python benchmarks/carry_text_encoder.py unpack .carry/minilm_pack /tmp/minilm
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FILES = ("config.json", "modules.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
         "vocab.txt")  # fmt: skip
POSITIONS = 64


def _vocabulary_ids(tokenizer) -> list[int]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from sdeflow.data.captions import COLORS, POSITIONS, PREFIXES, RELATIONS, SHAPES, SIZES
    from sdeflow.data.shapes import make_scene

    words = [*COLORS, *SHAPES, *SIZES, *POSITIONS, *RELATIONS, *PREFIXES, "circles squares triangles crosses",
             "a an one two three at the in on corner to and of , . center"]  # fmt: skip
    words += [make_scene(0, i, split).caption for i in range(2000) for split in ("train", "heldout")]
    ids = set(tokenizer.all_special_ids)
    for w in words:
        ids.update(tokenizer(w)["input_ids"])
    return sorted(ids)


def pack(dest: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    from sdeflow.models.text_encoder import resolve_text_encoder

    src = resolve_text_encoder("minilm")
    model, tok = AutoModel.from_pretrained(src), AutoTokenizer.from_pretrained(src)
    ids = torch.tensor(_vocabulary_ids(tok))
    out: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        if k.endswith("word_embeddings.weight"):
            out[f"{k}::rows"], out[f"{k}::values"] = ids, v[ids].half()
        elif k.endswith("position_embeddings.weight"):
            out[f"{k}::head"] = v[:POSITIONS].half()
        elif v.ndim == 2 and v.shape[1] >= 64:
            scale = v.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
            out[f"{k}::q8"], out[f"{k}::scale"] = (v / scale).round().to(torch.int8), scale.float()
        elif v.is_floating_point():
            out[k] = v.half()
    dest.mkdir(parents=True, exist_ok=True)
    save_file(out, dest / "packed.safetensors")
    for f in FILES:
        if (src / f).is_file():
            shutil.copy(src / f, dest / f)
    size = sum(p.stat().st_size for p in dest.iterdir())
    print(json.dumps({"dest": str(dest), "bytes": size, "vocabulary_rows": len(ids)}))


def unpack(src: Path, dest: Path) -> None:
    from transformers import AutoConfig, AutoModel

    model = AutoModel.from_config(AutoConfig.from_pretrained(src))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    packed = load_file(src / "packed.safetensors")
    for k in state:
        if f"{k}::rows" in packed:
            state[k].zero_()
            state[k][packed[f"{k}::rows"].long()] = packed[f"{k}::values"].float()
        elif f"{k}::head" in packed:
            state[k].zero_()
            state[k][:POSITIONS] = packed[f"{k}::head"].float()
        elif f"{k}::q8" in packed:
            state[k] = packed[f"{k}::q8"].float() * packed[f"{k}::scale"]
        elif k in packed:
            state[k] = packed[k].float()
    model.load_state_dict(state)
    model.save_pretrained(dest)
    for f in FILES:
        if (src / f).is_file() and f != "config.json":
            shutil.copy(src / f, dest / f)
    print(json.dumps({"dest": str(dest)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["pack", "unpack"])
    p.add_argument("paths", nargs="+")
    a = p.parse_args()
    if a.action == "pack":
        pack(Path(a.paths[0]))
    else:
        unpack(Path(a.paths[0]), Path(a.paths[1]))


if __name__ == "__main__":
    main()
