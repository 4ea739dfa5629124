"""The shape the architecture pass leaves: inference never loads training code, the loop trains any objective
(two optimizers, frozen modules) with exact resume, one table of sampler facts, old import paths still work."""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdeflow
from sdeflow.checkpoint import CheckpointError, find_latest
from sdeflow.config import load_config
from sdeflow.training import Objective, Trainer

ROOT = Path(__file__).resolve().parents[1]


def _digits_run(tmp_path):
    cfg = load_config(
        None,
        [
            f"out_dir={tmp_path / 'run'}",
            "data.name=digits",
            "model.kind=unet",
            "model.preset=small",
            "model.num_classes=10",
            "model.kwargs={model_channels: 16}",
            "train.steps=2",
            "train.batch_size=8",
            "train.tensorboard=false",
            "sample.n=4",
            "sample.steps=2",
        ],
    )
    Trainer(cfg, progress=False).fit()
    return find_latest(tmp_path / "run" / "checkpoints")


def test_loading_and_sampling_never_import_training_code(tmp_path):
    ck = _digits_run(tmp_path)
    script = textwrap.dedent(f"""
        import sys, torch, sdeflow
        from sdeflow.cli import main
        m = sdeflow.load({str(ck)!r})
        assert m.data_shape == (1, 8, 8) and m.num_classes == 10 and m.step == 2
        r = sdeflow.sample(m.denoiser, (4, *m.data_shape), m.process, "dpmpp_2m", steps=3, seed=0,
                           cond=torch.arange(4))
        assert r.samples.shape == (4, 1, 8, 8) and torch.isfinite(r.samples).all() and r.nfe == 3
        assert main(["sample", {str(ck)!r}, "--sampler", "dpmpp_2m", "--steps", "3", "--n", "4",
                     "--out", {str(tmp_path / "s")!r}]) == 0
        loaded = sorted(n for n in sys.modules if n.startswith("sdeflow.training"))
        print("TRAINING_MODULES", loaded)
        assert not loaded, loaded
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TRAINING_MODULES []" in out.stdout


def test_load_returns_the_trained_ema_denoiser(tmp_path):
    ck = _digits_run(tmp_path)
    m = sdeflow.load(ck)
    raw = sdeflow.load(ck, ema=False)
    ema_w = dict(m.denoiser.net.named_parameters())
    raw_w = dict(raw.denoiser.net.named_parameters())
    from safetensors.torch import load_file

    for name, file, weights in (("ema", "ema.safetensors", ema_w), ("model", "model.safetensors", raw_w)):
        saved = load_file(ck / file)
        assert all(torch.equal(weights[k], saved[k]) for k in weights), name
    assert not m.denoiser.training and m.process.name == "edm" and m.recipe.parameterization == "edm"


class ToyGAN(Objective):
    """A generator/discriminator pair with the non-saturating loss (Goodfellow et al. 2014), two optimizers."""

    name = "toy_gan"
    phases = ("disc", "gen")

    def __init__(self):
        super().__init__()
        self.gen = nn.Sequential(nn.Linear(4, 32), nn.SiLU(), nn.Linear(32, 2))
        self.disc = nn.Sequential(nn.Linear(2, 32), nn.SiLU(), nn.Dropout(0.1), nn.Linear(32, 1))

    def parameters_for(self, phase):
        return list((self.disc if phase == "disc" else self.gen).parameters())

    def optimizer_options(self, phase):
        return {"betas": (0.5, 0.9)}

    def loss(self, batch, phase):
        fake = self.gen(batch.randn(4))
        if phase == "disc":
            return F.softplus(-self.disc(batch.x)).mean() + F.softplus(self.disc(fake.detach())).mean()
        return F.softplus(-self.disc(fake)).mean()


def _gan_cfg(tmp_path, name):
    return load_config(
        None,
        [
            f"out_dir={tmp_path / name}",
            "data.name=toy:8gaussians",
            "data.num_samples=512",
            "model.kind=mlp",
            "train.steps=12",
            "train.batch_size=32",
            "train.grad_accum=2",
            "train.ckpt_every=4",
            "train.keep_last=5",
            "train.lr=1e-3",
            "train.lr_schedule=cosine",
            "train.tensorboard=false",
            "train.log_every=1",
        ],
    )


def _gan(seed=0):
    torch.manual_seed(seed)
    return ToyGAN()


def test_two_optimizer_objective_trains_through_the_loop_and_resumes_bitwise(tmp_path):
    a = Trainer(_gan_cfg(tmp_path, "a"), progress=False, objective=_gan())
    before = {k: v.clone() for k, v in a.objective.state_dict().items()}
    a.fit()
    after = a.objective.state_dict()
    assert set(a.phases) == {"disc", "gen"}
    disc_opt = a.phases["disc"].optimizer
    assert disc_opt.defaults["betas"] == (0.5, 0.9)
    disc_ids = {id(p) for p in a.objective.disc.parameters()}
    assert {id(p) for g in disc_opt.param_groups for p in g["params"]} == disc_ids
    assert all(not torch.equal(before[k], after[k]) for k in before)  # both players were updated
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and {"loss/disc", "loss/gen"} <= set(rows[0])
    assert all(r["loss"] == pytest.approx(r["loss/disc"] + r["loss/gen"]) for r in rows)

    cfg_b = _gan_cfg(tmp_path, "b")
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg_b, progress=False, stop_after=6, objective=_gan()).fit()  # "killed" at 6, last checkpoint 4
    b = Trainer(cfg_b, resume=True, progress=False, objective=_gan(seed=1))  # other init: the checkpoint wins
    assert b.step == 4
    b.fit()
    assert a.losses == b.losses  # bitwise
    assert all(torch.equal(after[k], v) for k, v in b.objective.state_dict().items())
    with pytest.raises(CheckpointError, match="objective 'toy_gan'"):
        sdeflow.load(find_latest(tmp_path / "b" / "checkpoints"))


class FrozenBaseWithAdapter(Objective):
    """A frozen base network and a trainable low-rank adapter beside it (the shape of LoRA fine-tuning)."""

    name = "adapter"

    def __init__(self):
        super().__init__()
        self.base = nn.Linear(2, 2).requires_grad_(False)
        self.down, self.up = nn.Linear(2, 1, bias=False), nn.Linear(1, 2, bias=False)
        nn.init.zeros_(self.up.weight)

    def parameters_for(self, phase):
        return [*self.down.parameters(), *self.up.parameters()]

    def loss(self, batch, phase):
        pred = self.base(batch.x) + self.up(self.down(batch.x))
        return F.mse_loss(pred, batch.x.flip(-1))


def test_frozen_base_stays_bitwise_unchanged(tmp_path):
    torch.manual_seed(0)
    obj = FrozenBaseWithAdapter()
    base = {k: v.clone() for k, v in obj.base.state_dict().items()}
    tr = Trainer(_gan_cfg(tmp_path, "adapter"), progress=False, objective=obj)
    tr.fit()
    assert all(torch.equal(base[k], v) for k, v in obj.base.state_dict().items())
    assert obj.up.weight.abs().sum() > 0 and tr.losses[-1] < tr.losses[0]


def test_old_module_paths_are_the_new_modules():
    import sdeflow.samplers
    import sdeflow.schedules
    from sdeflow.metrics import sliced_wasserstein
    from sdeflow.process import VPLinearProcess

    import sdeflow.core.process
    import sdeflow.evaluation.metrics
    import sdeflow.sampling.samplers
    import sdeflow.sampling.schedules

    assert sdeflow.samplers is sdeflow.sampling.samplers and sdeflow.schedules is sdeflow.sampling.schedules
    assert VPLinearProcess is sdeflow.core.process.VPLinearProcess
    assert sliced_wasserstein is sdeflow.evaluation.metrics.sliced_wasserstein
    from sdeflow.training import build_denoiser, build_network, build_recipe  # noqa: F401 (old names)


def test_no_module_over_400_lines_and_a_short_loop():
    long = {
        str(p.relative_to(ROOT)): n
        for p in (ROOT / "src").rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 400
    }
    assert not long, long
    loop = (ROOT / "src/sdeflow/training/loop.py").read_text()
    trainer = loop[loop.index("class Trainer") :]
    assert len(trainer.splitlines()) < 200


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sample.sampler=eulr", "sample.sampler must be one of"),
        ("sample.schedule=wobbly", "sample.schedule must be one of"),
        ("sample.steps=0", "sample.steps must be >= 1"),
        ("sample.n=0", "sample.n must be >= 1"),
        ("diffusion.recipe=ddpn", "diffusion.recipe must be one of"),
        ("diffusion.process=vpp", "diffusion.process must be one of"),
        ("diffusion.parameterization=noise", "diffusion.parameterization must be one of"),
        ("diffusion.weighting=snr", "diffusion.weighting must be one of"),
        ("model.kind=resnet", "model.kind must be one of"),
        ("train.ema={kind: average}", "train.ema.kind must be one of"),
        ("train.optimizer=adamm", "unknown torch optimizer 'adamm'"),
        ("train.lr_schedule=step", "train.lr_schedule must be one of"),
        ("data.name=toy:donut", "unknown dataset 'toy:donut'"),
        ("train.batch_size=15", "divisible by train.grad_accum"),
    ],
)
def test_config_values_are_checked_when_loaded(override, message):
    from sdeflow.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, ["train.grad_accum=2", override])


def test_one_precision_table_for_trainer_sampler_and_cli():
    from sdeflow.cli import build_parser
    from sdeflow.config import PRECISIONS
    from sdeflow.sampling import PRECISIONS as sampling_precisions

    assert sampling_precisions is PRECISIONS
    action = next(
        a for a in build_parser()._subparsers._group_actions[0].choices["sample"]._actions if a.dest == "precision"
    )
    assert list(action.choices) == list(PRECISIONS)


LAYERS = [  # bottom up, as the README's layout lists them; a module may import only from its layer or below
    {"_moved", "core", "errors"},
    {"models"},
    {"data"},
    {"checkpoint"},
    {"sampling", "interop"},
    {"config", "config_objectives", "config_train"},
    {"builders"},
    {"evaluation"},
    {"training"},
    {"demo"},
    {"cli"},
]


def test_every_import_goes_down_the_layers():
    import ast

    layer = {name: i for i, names in enumerate(LAYERS) for name in names}
    src = ROOT / "src" / "sdeflow"
    upward = []
    for path in src.rglob("*.py"):
        parts = path.relative_to(src).with_suffix("").parts
        if parts == ("__init__",):
            continue  # the package's public face gathers every layer
        own = layer[parts[0]]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                package = parts[: len(parts) - node.level]  # `from ..x import` climbs `level` folders
                names = [n for n in (*package, *(node.module or "").split(".")) if n]
                top = names[0] if names else node.names[0].name
                if top in layer and layer[top] > own:
                    upward.append(f"{'/'.join(parts)} imports {'.'.join(names)} (layer {layer[top]} > {own})")
    assert not upward, upward
