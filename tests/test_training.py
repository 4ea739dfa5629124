"""Trainer: exact resume, atomic and verified checkpoints, DDP equivalence, NaN guard, configs and CLI."""

import json
import math
from pathlib import Path

import pytest
import torch

from sdeflow.checkpoint import CheckpointError, find_latest, load_checkpoint, save_checkpoint
from sdeflow.cli import main as cli_main
from sdeflow.config import ConfigError, load_config
from sdeflow.training import Trainer, TrainingDivergedError

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp_path, *extra, name="run"):
    base = [
        f"out_dir={tmp_path / name}",
        "data.name=digits",
        "model.kind=unet",
        "model.preset=small",
        "model.num_classes=10",
        "model.kwargs={model_channels: 16, dropout: 0.1}",
        "diffusion.recipe=edm",
        "train.steps=12",
        "train.batch_size=16",
        "train.grad_accum=2",
        "train.ckpt_every=4",
        "train.keep_last=5",
        "train.label_dropout=0.2",
        "train.ema={kind: power, std: 0.1}",
        "train.warmup_steps=3",
        "train.lr_schedule=cosine",
        "train.tensorboard=false",
        "train.log_every=1",
        "sample.n=4",
        "sample.steps=2",
    ]
    return load_config(None, base + list(extra))


def _weights(trainer):
    return {k: v.clone() for k, v in trainer.objective.net.state_dict().items()}


def test_kill_and_resume_is_bitwise_identical(tmp_path):
    a = Trainer(_cfg(tmp_path, name="a"), progress=False)
    a.fit()
    cfg_b = _cfg(tmp_path, name="b")
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg_b, progress=False, stop_after=6).fit()  # "killed" at step 6; last checkpoint: step 4
    assert find_latest(tmp_path / "b" / "checkpoints").name == "step_00000004"
    (tmp_path / "b" / "checkpoints" / ".step_00000006.killed").mkdir()  # what a kill mid-write leaves
    b = Trainer(cfg_b, resume=True, progress=False)
    assert b.step == 4
    b.fit()
    assert len(a.losses) == len(b.losses) == 12
    assert a.losses == b.losses  # bitwise
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ema_a, ema_b = a.objective.ema.model, b.objective.ema.model
    assert all(torch.equal(x, y) for x, y in zip(ema_a.parameters(), ema_b.parameters()))
    assert (tmp_path / "a" / "loss.png").is_file() and (tmp_path / "a" / "samples.png").is_file()
    assert (tmp_path / "a" / "config.yaml").is_file() and (tmp_path / "a" / "metrics.jsonl").is_file()
    assert not [p.name for p in (tmp_path / "b" / "checkpoints").iterdir() if p.name.startswith(".")]
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # one line per step although steps 5 and 6 ran twice


def test_interrupted_checkpoint_write_leaves_previous_loadable(tmp_path, monkeypatch):
    net = torch.nn.Linear(3, 2)
    d = tmp_path / "ck"
    save_checkpoint(d, 1, net, None, {"step": 1})
    import sdeflow.checkpoint as ck

    def crash(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ck.torch, "save", crash)  # dies after the weights were written, before state.pt
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(d, 2, net, None, {"step": 2})
    monkeypatch.undo()
    (d / ".step_00000003.killed").mkdir()  # what a SIGKILL mid-write would leave behind
    (d / ".step_00000003.killed" / "model.safetensors").write_bytes(b"partial")
    assert [p.name for p in d.iterdir() if p.name.startswith("step_")] == ["step_00000001"]
    assert find_latest(d).name == "step_00000001"
    loaded = load_checkpoint(find_latest(d))
    torch.testing.assert_close(loaded["model"]["weight"], net.weight.detach())


def test_corrupted_checkpoints_are_refused(tmp_path, capsys):
    tr = Trainer(_cfg(tmp_path, "train.steps=4"), progress=False)
    tr.fit()
    ck = find_latest(tmp_path / "run" / "checkpoints")
    good = load_checkpoint(ck)
    assert good["state"]["step"] == 4
    weights = ck / "ema.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted checkpoint file .*ema.safetensors"):
        load_checkpoint(ck)
    assert cli_main(["sample", str(ck), "--n", "2", "--out", str(tmp_path / "s")]) == 2
    assert "corrupted checkpoint file" in capsys.readouterr().err
    (ck / "state.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(CheckpointError):
        load_checkpoint(ck, verify=False)
    (ck / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(ck)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope")


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path):
    tr = Trainer(_cfg(tmp_path, "train.grad_accum=1"), progress=False)
    orig = tr.stream.batch

    def poisoned(step, micro, phase=0):
        batch = orig(step, micro, phase)
        if step >= 5:  # data turns bad after step 5: the loss of step 6 is NaN
            batch.x = batch.x.clone()
            batch.x[0, 0, 0, 0] = float("nan")
        return batch

    tr.stream.batch = poisoned
    with pytest.raises(TrainingDivergedError, match=r"loss is nan at step 6.*step_00000004"):
        tr.fit()
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000004"]
    assert all(
        torch.isfinite(v).all() for v in load_checkpoint(tmp_path / "run" / "checkpoints" / ckpts[0])["model"].values()
    )


def test_compile_options_reach_torch_compile(tmp_path, monkeypatch):
    """train.compile_options are Inductor options handed to torch.compile in place of a mode."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    opts = "train.compile_options={coordinate_descent_tuning: true}"
    Trainer(_cfg(tmp_path, "train.compile=true", opts), progress=False)
    Trainer(_cfg(tmp_path, "train.compile=true", "train.compile_mode=max-autotune", name="b"), progress=False)
    assert seen == [{"options": {"coordinate_descent_tuning": True}}, {"mode": "max-autotune"}]


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'train.lrr'"):
        load_config(None, ["train.lrr=0.1"])
    with pytest.raises(ConfigError, match="train.steps: expected an integer"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(ConfigError, match="train.ema.decay: expected a float"):
        load_config(None, ["train.ema={decay: fast}"])
    with pytest.raises(ConfigError, match="train.lr: expected a float"):
        load_config(None, ["train.lr=[1]"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  kind: unet\n  widht: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'model.widht'"):
        load_config(bad)
    bad.write_text("train: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    assert load_config(None, ["train.lr=2e-4"]).train.lr == 2e-4  # YAML 1.1 reads '2e-4' as text
    refused = [  # (override, error, message the error must contain, further overrides)
        ("train.precision=fp8", ConfigError, "train.precision"),
        ("train.batch_size=15", ConfigError, "divisible"),
        ("data.name=cifar11", ValueError, "unknown dataset 'cifar11'"),
        ("data.name=cifar10", ValueError, "data.path is required"),
        ("train.attention_backend=fastest", ConfigError, "train.attention_backend"),
        ("train.norm_backend=apex", ConfigError, "train.norm_backend"),
        ("train.compile_mode=turbo", ConfigError, "train.compile_mode"),
        ("train.compile_options={warp_speed: true}", ConfigError, r"unknown Inductor option\(s\) \['warp_speed'\]"),
        ("train.compile_options=[1]", ConfigError, "train.compile_options: expected a mapping"),
        (
            "train.compile_options={b: 1}",
            ConfigError,
            "exclude a train.compile_mode",
            "train.compile_mode=max-autotune",
        ),
    ]
    for override, error, message, *more in refused:
        with pytest.raises(error, match=message):
            Trainer(_cfg(tmp_path, override, *more), progress=False)


def test_channels_last_training_matches_and_checkpoints(tmp_path):
    """NHWC weights and activations train to the same losses (to float rounding), save and resume."""
    a = Trainer(_cfg(tmp_path, "train.steps=4", name="a"), progress=False)
    a.fit()
    b = Trainer(_cfg(tmp_path, "train.steps=4", "train.channels_last=true", name="b"), progress=False)
    conv = next(m for m in b.objective.net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x0 = b.stream.batch(0, 0).x
    assert x0.is_contiguous(memory_format=torch.channels_last)
    b.fit()
    torch.testing.assert_close(torch.tensor(b.losses), torch.tensor(a.losses), rtol=1e-4, atol=1e-6)
    c = Trainer(_cfg(tmp_path, "train.steps=4", "train.channels_last=true", name="b"), resume=True, progress=False)
    assert c.step == 4
    assert all(torch.equal(p, q) for p, q in zip(b.objective.net.parameters(), c.objective.net.parameters()))


def _fake_cifar(root: Path) -> Path:
    from test_data import write_cifar10

    write_cifar10(root, n_per_batch=8)
    return root


CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {"toy_ddpm", "toy_ncsn", "toy_vp", "toy_ve", "toy_edm", "toy_rectified_flow", "toy_sd3"} <= names
    assert any(n.startswith("digits_") for n in names) and any(n.startswith("mnist_") for n in names)
    assert any(n.startswith("cifar10_") for n in names)


FINETUNE_BASES = {  # a fine-tuning config: (the config of its base, overrides)
    "shapes_controlnet": ("shapes_unet.yaml", ["data.num_samples=64"]),
    "mnist_lora": ("mnist_edm.yaml", ["model.num_classes=0", "train.label_dropout=0"]),
    "mnist_reflow": ("mnist_rectified_flow.yaml", []),
    "mnist_reflow_distill": ("mnist_rectified_flow.yaml", []),
    "mnist_consistency": ("mnist_edm.yaml", []),
}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_trains_two_steps(path, tmp_path):
    over = [
        f"out_dir={tmp_path / path.stem}",
        "train.steps=2",
        "train.batch_size=8",
        "train.precision=fp32",
        "train.tensorboard=false",
        "train.ckpt_every=0",
        "train.sample_every=0",
        "sample.n=4",
        "sample.steps=2",
    ]
    if "cifar10" in path.stem:
        over.append(f"data.path={_fake_cifar(tmp_path / 'cifar')}")
    based = path.stem in FINETUNE_BASES  # fine-tuning, reflow, distillation: a 2-step base of the config named
    if based:
        base_cfg, base_over = FINETUNE_BASES[path.stem]
        base = load_config(ROOT / "configs" / base_cfg, [*over[1:], f"out_dir={tmp_path / 'base'}", *base_over])
        base.train.ckpt_every = 2
        Trainer(base, progress=False).fit()
        over.append(f"finetune.base={find_latest(tmp_path / 'base' / 'checkpoints')}")
        if "reflow" in path.stem:  # the base's couplings
            couplings = tmp_path / "couplings"
            assert cli_main(["reflow", over[-1].split("=", 1)[1], "--out", str(couplings), "--n", "8", "--steps", "2",
                             "--straightness", "0", "--device", "cpu"]) == 0  # fmt: skip
            over.append(f"data.path={couplings}")
    cfg0 = load_config(path, over[-2:] if "reflow" in path.stem else over[-1:] if based else [])
    if cfg0.data.name == "shapes":  # the real text encoder, a few captions
        over.append("data.num_samples=64")
    small_ae = ["autoencoder.disc_start=1", "autoencoder.perceptual_weight=0"]
    if cfg0.objective == "autoencoder":
        over += small_ae
    if cfg0.diffusion.autoencoder:  # latent diffusion: a 2-step autoencoder of the same layout
        ae = load_config(ROOT / "configs" / "mnist_ae_kl.yaml", [*over[1:], f"out_dir={tmp_path / 'ae'}", *small_ae])
        over.append(f"diffusion.autoencoder={Trainer(ae, progress=False).fit()['checkpoint']}")
    ar = cfg0.autoregressive
    if cfg0.objective == "autoregressive":  # sampling draws 784 pixels one by one: a tiny network
        over += ["autoregressive.channels=8", "autoregressive.blocks=1", "autoregressive.width=32"]
        if ar.model == "vq_transformer":  # the prior of a 2-step VQ autoencoder of the same layout
            vq = load_config(
                ROOT / "configs" / "mnist_vqgan.yaml", [*over[1:9], f"out_dir={tmp_path / 'vq'}", *small_ae]
            )
            over.append(f"autoregressive.autoencoder={Trainer(vq, progress=False).fit()['checkpoint']}")
    cfg = load_config(path, over)
    summary = Trainer(cfg, progress=False).fit()
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"]) and summary["final_loss"] > 0
    drawn = cfg.objective != "autoencoder" or cfg.autoencoder.reconstruction == "gaussian"
    assert (tmp_path / path.stem / ("samples.png" if drawn else "reconstructions.png")).is_file()


def test_cli_train_sample_and_class_flag(tmp_path, capsys):
    cfgp = tmp_path / "c.yaml"
    cfgp.write_text((ROOT / "configs" / "digits_edm.yaml").read_text())

    def train(steps, *extra):
        sets = [f"train.steps={steps}", "train.batch_size=8", "sample.n=4", "sample.steps=2", "train.tensorboard=false"]
        args = ["train", str(cfgp), "--out", str(tmp_path / "r"), "--quiet", *extra]
        return cli_main(args + [a for kv in sets for a in ("--set", kv)])

    assert train(3) == 0
    ck = find_latest(tmp_path / "r" / "checkpoints")
    out = tmp_path / "s"
    assert (
        cli_main(
            [
                "sample",
                str(ck),
                "--sampler",
                "dpmpp_2m",
                "--steps",
                "4",
                "--n",
                "6",
                "--seed",
                "1",
                "--out",
                str(out),
                "--class",
                "3",
                "--cfg",
                "2.0",
                "--cfg-interval",
                "0.1,10",
            ]
        )
        == 0
    )
    import numpy as np

    z = np.load(out / "samples.npz")
    assert z["x"].shape == (6, 1, 8, 8) and (z["y"] == 3).all() and (out / "samples.png").is_file()
    # bf16 network: the same samples up to bf16 rounding
    args = ["sample", str(ck), "--sampler", "euler", "--steps", "3", "--n", "4", "--seed", "1"]
    assert cli_main([*args, "--out", str(tmp_path / "f32")]) == 0
    assert cli_main([*args, "--out", str(tmp_path / "b16"), "--precision", "bf16"]) == 0
    f32, b16 = (np.load(tmp_path / d / "samples.npz")["x"] for d in ("f32", "b16"))
    assert 0 < np.abs(f32 - b16).max() < 0.1
    w16 = ["--precision", "bf16", "--cast-weights", "--channels-last"]
    assert cli_main([*args, "--out", str(tmp_path / "w16"), *w16]) == 0
    assert 0 < np.abs(f32 - np.load(tmp_path / "w16" / "samples.npz")["x"]).max() < 0.1
    capsys.readouterr()
    assert cli_main([*args, "--out", str(tmp_path / "x"), "--cast-weights"]) == 2
    assert "--cast-weights needs --precision" in capsys.readouterr().err
    assert train(5, "--resume") == 0  # resume from the command line continues where it stopped
    assert find_latest(tmp_path / "r" / "checkpoints").name == "step_00000005"
    assert cli_main(["train", str(tmp_path / "missing.yaml")]) == 2


def test_cli_demo_writes_grid_plot_and_metrics(tmp_path):
    import json

    assert cli_main(["demo", "--out", str(tmp_path / "demo"), "--steps", "4", "--quiet"]) == 0
    m = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert {"fd_classifier_features", "class_accuracy_of_samples", "final_loss"} <= set(m)
    assert (tmp_path / "demo" / "samples.png").is_file() and (tmp_path / "demo" / "loss.png").is_file()


def test_divergence_guard_names_a_checkpoint_with_finite_weights_that_samples(tmp_path):
    """A loss spike (data scaled by 10⁴ after step 6: the loss jumps by ~10⁸) stops the run before anything is
    saved; the checkpoint the message names loads and samples finite images."""
    import re

    import sdeflow

    cfg = _cfg(tmp_path, "train.grad_accum=1", "train.divergence_window=3", "train.divergence_factor=100")
    tr = Trainer(cfg, progress=False)
    orig = tr.stream.batch

    def exploding(step, micro, phase=0):
        batch = orig(step, micro, phase)
        if step >= 6:
            batch.x = batch.x * 1e4
        return batch

    tr.stream.batch = exploding
    with pytest.raises(TrainingDivergedError, match=r"over 100× the median .* at step 7") as info:
        tr.fit()
    named = Path(re.search(r"last good checkpoint is (\S+?);", str(info.value)).group(1))
    assert named.name == "step_00000004" and sorted(p.name for p in named.parent.glob("step_*")) == [named.name]
    m = sdeflow.load(named)
    x = sdeflow.sample(m.denoiser, (4, *m.data_shape), m.process, "euler", steps=3, seed=0, cond=torch.arange(4))
    assert torch.isfinite(x.samples).all()


def test_non_finite_weights_are_never_saved(tmp_path):
    tr = Trainer(_cfg(tmp_path, "train.steps=2"), progress=False)
    tr.fit()
    with torch.no_grad():
        next(tr.objective.net.parameters()).fill_(float("inf"))
    tr.step = 8
    with pytest.raises(TrainingDivergedError, match=r"weights are not finite \(nothing saved\) at step 8.*step_0+2"):
        tr.save()
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")] == ["step_00000002"]


def test_a_rank_without_its_gpu_gets_one_message(monkeypatch):
    """torchrun with more processes per host than GPUs: the rank whose GPU is missing is refused by name, before
    anything touches CUDA; so is a CUDA device on a machine without one."""
    from sdeflow.config import TrainConfig
    from sdeflow.errors import ConfigError
    from sdeflow.training.runtime import Runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(ConfigError, match=r"rank 3 of 4 on this host \(LOCAL_RANK\) needs GPU 3, but this host has 2"):
        Runtime.start(TrainConfig(device="auto"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match="train.device 'cuda:5' needs GPU 5"):
        Runtime.start(TrainConfig(device="cuda:5"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no usable CUDA GPU"):
        Runtime.start(TrainConfig(device="cuda"))
