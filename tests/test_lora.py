"""LoRA through peft: an untrained adapter changes nothing, a layer's output is W x + s (α/r) B A x by hand (one
adapter or several), merge then unmerge returns the base, merged equals unmerged, save/load is exact and refuses
another base or a damaged file; fine-tuning through the loop trains the adapters only, never touches the base's
files, resumes bitwise, and samples the same through the run and through ``sdeflow sample BASE --lora``."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from helpers import kill_and_resume
from sdeflow.checkpoint import CheckpointError, find_latest
from sdeflow.cli import main
from sdeflow.config import ConfigError, load_config
from sdeflow.models import DiT, MMDiT, UNet
from sdeflow.models.lora import (
    LoraSpec,
    activate_lora,
    add_lora,
    architecture_fingerprint,
    load_lora,
    lora_targets,
    merge_lora,
    save_lora,
    set_lora_scale,
    unmerge_lora,
)
from sdeflow.training import Trainer


def _randomised(net):
    torch.manual_seed(1)
    with torch.no_grad():  # zero-initialised outputs (adaLN-Zero, the UNet's last conv) would hide every difference
        for p in net.parameters():
            p.normal_(0, 0.2)
    return net


def _nets():
    from sdeflow.core.condition import TextCondition

    text = TextCondition(torch.randn(2, 3, 16), torch.ones(2, 3, dtype=torch.bool), torch.randn(2, 16))
    return [
        (UNet.preset("small_attn", img_resolution=8, in_channels=1), torch.randn(2, 1, 8, 8), None),
        (DiT(input_size=8, in_channels=1, hidden_size=32, depth=2, num_heads=2, patch_size=2), torch.randn(2, 1, 8, 8),
         None),
        (MMDiT(context_dim=16, pooled_dim=16, input_size=8, in_channels=1, hidden_size=32, depth=2, num_heads=2,
               patch_size=2), torch.randn(2, 1, 8, 8), text),
    ]  # fmt: skip


def _fill_adapters(net, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("index", [0, 1, 2], ids=["unet", "dit", "mmdit"])
def test_adapter_starts_as_identity_merges_and_unmerges(index, tmp_path):
    net, x, cond = _nets()[index]
    net = _randomised(net).eval().requires_grad_(False)  # frozen, as the adapter leaves it (CPU kernels differ)
    c = torch.tensor([0.3, -0.2])
    fp = architecture_fingerprint(net)
    base = {k: v.clone() for k, v in net.state_dict().items()}
    y0 = net(x, c, cond)
    params = add_lora(net, LoraSpec(rank=2, alpha=4.0, targets=["attention", "mlp", "conv", "ada"]))
    assert torch.equal(net(x, c, cond), y0)  # B = 0: the untrained adapter changes nothing, bit for bit
    assert architecture_fingerprint(net) == fp and params and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in net.named_parameters() if "lora_" not in n)  # the base is frozen
    _fill_adapters(net)
    y1 = net.requires_grad_(False)(x, c, cond)
    assert (y1 - y0).abs().max() > 1e-3
    merge_lora(net)
    assert torch.allclose(net(x, c, cond), y1, atol=1e-5)  # merged output = unmerged output with the adapter
    unmerge_lora(net)
    after = {k.replace(".base_layer", ""): v for k, v in net.state_dict().items() if "lora_" not in k}
    assert after.keys() == base.keys()
    assert max(float((after[k] - base[k]).abs().max()) for k in base) < 1e-6  # the base is back
    save_lora(net, tmp_path / "a", LoraSpec(rank=2, alpha=4.0, targets=["attention", "mlp", "conv", "ada"]))
    fresh = _nets()[index][0]
    fresh.load_state_dict(base)
    load_lora(fresh.eval(), tmp_path / "a")
    assert torch.equal(fresh(x, c, cond), y1)  # saved and loaded: identical outputs
    set_lora_scale(fresh, 0.0)
    assert torch.allclose(fresh(x, c, cond), y0, atol=1e-6)


def test_one_layer_by_hand_with_scale_and_two_adapters(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("proj", nn.Linear(6, 5))
    x = torch.randn(3, 6)
    add_lora(net, LoraSpec(rank=2, alpha=3.0, targets=["proj"]), "a")
    add_lora(net, LoraSpec(rank=1, alpha=5.0, targets=["proj"]), "b")
    _fill_adapters(net)
    layer = net.proj
    w, bias = layer.base_layer.weight, layer.base_layer.bias
    da = layer.lora_B["a"].weight @ layer.lora_A["a"].weight
    db = layer.lora_B["b"].weight @ layer.lora_A["b"].weight
    activate_lora(net, ["a"])
    set_lora_scale(net, 0.5, "a")
    assert torch.allclose(net(x), x @ (w + 0.5 * (3.0 / 2) * da).T + bias, atol=1e-6)  # W x + s (α/r) B A x
    activate_lora(net, ["a", "b"])  # several adapters: their updates add
    assert torch.allclose(net(x), x @ (w + 0.75 * da + 5.0 * db).T + bias, atol=1e-6)
    assert lora_targets(net, ["proj"]) == ["proj"]  # a layer with adapters is still a target for another


def test_bad_adapters_and_ranks_are_refused(tmp_path):
    a = _randomised(DiT(input_size=8, in_channels=1, hidden_size=32, depth=1, num_heads=2, patch_size=2))
    add_lora(a, LoraSpec(rank=2, targets=["attention"]))
    save_lora(a, tmp_path / "ad", LoraSpec(rank=1, targets=["attention"]))
    save_lora(a, tmp_path / "ad", LoraSpec(rank=2, targets=["attention"]))  # written again: replaced whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]  # no temporary or old folder left behind
    meta = json.loads((tmp_path / "ad" / "adapter.json").read_text())
    assert meta["target_modules"] == ["blocks.0.proj", "blocks.0.qkv"] and meta["spec"]["rank"] == 2
    other = DiT(input_size=8, in_channels=1, hidden_size=64, depth=1, num_heads=2, patch_size=2)
    with pytest.raises(CheckpointError, match="trained for another base network"):
        load_lora(other, tmp_path / "ad")
    with pytest.raises(CheckpointError, match="not a LoRA adapter folder"):
        load_lora(other, tmp_path)
    raw = bytearray((tmp_path / "ad" / "adapter.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    (tmp_path / "ad" / "adapter.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        load_lora(DiT(input_size=8, in_channels=1, hidden_size=32, depth=1, num_heads=2, patch_size=2), tmp_path / "ad")
    with pytest.raises(ValueError, match=r"lora rank 40 is larger than the layer allows: .*blocks.0.qkv \(rank ≤ 32\)"):
        add_lora(DiT(input_size=8, in_channels=1, hidden_size=32, depth=1, num_heads=2, patch_size=2),
                 LoraSpec(rank=40, targets=["attention"]))  # fmt: skip
    with pytest.raises(ValueError, match="select no Linear or Conv2d layer"):
        lora_targets(a, ["nothing_here"])


# --- fine-tuning through the loop --------------------------------------------------------------------------------

BASE = ["data.name=digits", "data.resolution=8", "train.batch_size=8", "train.log_every=1", "sample.n=4",
        "sample.steps=2", "train.tensorboard=false", "model.kind=dit", "model.preset=null",
        "model.kwargs={input_size: 8, hidden_size: 32, depth: 2, num_heads: 2, patch_size: 2}"]  # fmt: skip
LORA = ["finetune.method=lora", "finetune.lora_rank=2", "train.ckpt_every=2", "train.lr=1e-2", "train.ema.decay=0.5",
        "finetune.lora_targets=[attention, mlp, ada]"]  # fmt: skip


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("base")
    cfg = load_config(
        None,
        [
            *BASE,
            "train.steps=10",
            "train.ckpt_every=10",
            "train.lr=1e-2",
            "train.ema.kind=none",
            f"out_dir={tmp / 'base'}",
        ],
    )
    Trainer(cfg, progress=False).fit()
    return find_latest(tmp / "base" / "checkpoints")


def test_lora_trains_the_adapter_only_and_samples_the_same_through_sdeflow_sample(tmp_path, base_run, capsys):
    before = _hashes(base_run)
    cfg = load_config(None, [*BASE, *LORA, "train.steps=4", f"out_dir={tmp_path / 'lora'}", "model.kind=unet",
                             f"finetune.base={base_run}"])  # fmt: skip
    t = Trainer(cfg, progress=False)
    assert t.cfg.model.kind == "dit"  # the base's model section wins
    start = {k: v.clone() for k, v in t.objective.net.state_dict().items()}
    summary = t.fit()
    end = t.objective.net.state_dict()
    frozen = [k for k in start if "lora_" not in k]
    assert frozen and all(torch.equal(start[k], end[k]) for k in frozen)  # the base's weights: bitwise unchanged
    assert any(not torch.equal(start[k], end[k]) for k in start if "lora_B" in k)  # the adapters trained
    assert _hashes(base_run) == before  # and the base's files are untouched
    n_all = sum(p.numel() for p in t.objective.net.parameters())
    assert 0 < summary["trainable_parameters"] < 0.2 * n_all
    adapter = tmp_path / "lora" / "adapter"
    assert summary["adapter"] == str(adapter) and (adapter / "adapter.json").is_file()
    run = find_latest(tmp_path / "lora" / "checkpoints")
    capsys.readouterr()
    for args, out in (([str(run)], "run"), ([str(base_run), "--lora", str(adapter)], "base_lora"),
                      ([str(base_run)], "base")):  # fmt: skip
        assert main(["sample", *args, "--n", "4", "--steps", "3", "--out", str(tmp_path / out)]) == 0
    x = {o: np.load(tmp_path / o / "samples.npz")["x"] for o in ("run", "base_lora", "base")}
    assert np.array_equal(x["run"], x["base_lora"])  # the run and base + adapter: the same samples
    assert np.abs(x["run"] - x["base"]).max() > 1e-3
    assert main(["sample", str(base_run), "--lora", str(adapter), "--lora-scale", "0", "--n", "4", "--steps", "3",
                 "--out", str(tmp_path / "zero")]) == 0  # fmt: skip
    assert np.allclose(np.load(tmp_path / "zero" / "samples.npz")["x"], x["base"], atol=1e-5)


def test_lora_run_resumes_bitwise_and_full_finetuning_trains_everything(tmp_path, base_run):
    over = [*BASE, *LORA, "train.steps=4", f"finetune.base={base_run}"]
    kill_and_resume(load_config(None, [*over, f"out_dir={tmp_path / 'a'}"]),
                    load_config(None, [*over, f"out_dir={tmp_path / 'b'}"]))  # fmt: skip
    full = Trainer(load_config(None, [*BASE, "train.steps=2", f"finetune.base={base_run}",
                                      f"out_dir={tmp_path / 'full'}"]), progress=False)  # fmt: skip
    start = {k: v.clone() for k, v in full.objective.net.state_dict().items()}
    from sdeflow.checkpoint import load_checkpoint

    ck = load_checkpoint(base_run)
    weights = ck["ema"] or ck["model"]  # the base's EMA weights, its raw ones when it kept no EMA (as here)
    assert weights and all(torch.equal(start[k], weights[k].to(start[k].dtype)) for k in weights)
    full.fit()
    moved = [not torch.equal(start[k], v) for k, v in full.objective.net.state_dict().items() if "weight" in k]
    assert all(moved)  # full fine-tuning: every weight trains


def test_bad_finetuning_setups_name_the_field(tmp_path, base_run, capsys):
    with pytest.raises(ConfigError, match="finetune.method 'lora' adapts a trained model"):
        load_config(None, [*BASE, "finetune.method=lora"])
    with pytest.raises(ConfigError, match="finetune.method must be one of"):
        load_config(None, [*BASE, "finetune.method=dreambooth"])
    with pytest.raises(CheckpointError, match=r"not found.*\(finetune.base\)"):
        Trainer(load_config(None, [*BASE, *LORA, f"finetune.base={tmp_path / 'nowhere'}", f"out_dir={tmp_path / 'x'}"]),
                progress=False)  # fmt: skip
    with pytest.raises(ConfigError, match="finetune: lora rank 64 is larger than the layer allows"):
        Trainer(load_config(None, [*BASE, *LORA, "finetune.lora_rank=64", f"finetune.base={base_run}",
                                   f"out_dir={tmp_path / 'y'}"]), progress=False)  # fmt: skip
    with pytest.raises(ConfigError, match=r"was trained on data of shape \(1, 8, 8\).*\(1, 16, 16\)"):
        Trainer(load_config(None, [*BASE, *LORA, "data.resolution=16", f"finetune.base={base_run}",
                                   f"out_dir={tmp_path / 'z'}"]), progress=False)  # fmt: skip
    with pytest.raises(ConfigError, match="lies inside this run's out_dir"):
        Trainer(load_config(None, [*BASE, *LORA, f"finetune.base={base_run}", f"out_dir={base_run.parent.parent}"]),
                progress=False)  # fmt: skip
    capsys.readouterr()
    assert main(["sample", str(base_run), "--lora", str(tmp_path / "none"), "--n", "2"]) == 2
    assert "--lora" in capsys.readouterr().err
    assert main(["sample", str(base_run), "--lora-scale", "0.5", "--n", "2"]) == 2


def test_data_classes_keeps_the_chosen_labels_only():
    from sdeflow.config import DataConfig
    from sdeflow.data import build_dataset

    full = build_dataset(DataConfig(name="digits", resolution=8), 0)
    nines = build_dataset(DataConfig(name="digits", resolution=8, classes=[9]), 0)
    assert len(nines) == int((full.y == 9).sum()) and set(nines.y.tolist()) == {9}
    assert torch.equal(nines.x, full.x[full.y == 9]) and nines.num_classes == 10  # the label range is kept
    some = build_dataset(DataConfig(name="digits", resolution=8, classes=[0, 3]), 0)
    assert len(some) == int(((full.y == 0) | (full.y == 3)).sum())
    with pytest.raises(ConfigError, match="no images of these labels"):
        build_dataset(DataConfig(name="digits", resolution=8, classes=[12]), 0)
    with pytest.raises(ConfigError, match="data.classes selects labels of a labelled image dataset, not of 'shapes'"):
        load_config(None, ["data.name=shapes", "data.classes=[1]"])


def test_prior_preservation_adds_the_loss_on_the_base_samples(tmp_path, base_run):
    from sdeflow.builders import load
    from sdeflow.sampling import sample
    from sdeflow.training.stream import Batch

    over = [*BASE, "train.steps=4", f"finetune.base={base_run}", "finetune.prior_weight=0.5",
            "finetune.prior_samples=6", "train.ckpt_every=2"]  # fmt: skip
    t = Trainer(load_config(None, [*over, f"out_dir={tmp_path / 'p'}"]), progress=False)
    obj = t.objective
    m = load(base_run)  # the prior samples are the base's own, drawn with the config's sampler and a fixed seed
    s = t.cfg.sample
    want = sample(m.denoiser, (6, 1, 8, 8), m.process, s.sampler, s.steps, s.schedule, seed=t.cfg.seed + 7919).samples
    assert torch.allclose(obj._prior, want, atol=1e-5)
    x = torch.rand(4, 1, 8, 8) * 2 - 1

    def batch():
        return Batch(x, None, torch.Generator().manual_seed(5), 4, slice(0, 4))

    got = obj.loss(batch(), "model")
    b = batch()  # by hand, drawing in the same order: the data term, the prior indices, the prior term
    data_term = obj.dsm(b, x, None)
    idx = (b.rand() * 6).long()
    assert torch.allclose(got, data_term + 0.5 * obj.dsm(b, obj._prior[idx], None), atol=1e-6)
    kill_and_resume(load_config(None, [*over, f"out_dir={tmp_path / 'a'}"]),
                    load_config(None, [*over, f"out_dir={tmp_path / 'b'}"]))  # fmt: skip
    with pytest.raises(ConfigError, match="finetune.prior_weight preserves"):
        load_config(None, [*BASE, "finetune.prior_weight=1"])
