"""Few-step generation end to end on exact mixtures: reflow rounds, distillation, consistency distillation; and the
couplings, post-hoc EMA and optimised-schedule commands with their errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import kill_and_resume
from sdeflow import FlowProcess, GaussianMixture
from sdeflow.builders import load, resolve_base
from sdeflow.checkpoint import find_latest, load_checkpoint
from sdeflow.cli import main as cli_main
from sdeflow.config import config_from_dict, load_config
from sdeflow.errors import ConfigError, DataError
from sdeflow.evaluation.metrics import sliced_wasserstein
from sdeflow.sampling import sample
from sdeflow.sampling.couplings import generate_couplings, shard_seed
from sdeflow.sampling.paths import path_straightness
from sdeflow.training import Trainer
from sdeflow.training.consistency import ConsistencyObjective

GRID = GaussianMixture.grid_2d(3, 2.0, 0.15)  # nine modes: the exact flow's paths bend a lot
MLP = {"kind": "mlp", "preset": None, "kwargs": {"width": 128, "depth": 3}}


def train_cfg(out, steps, **sections):
    t = {"steps": steps, "batch_size": 256, "lr": 2e-3, "ckpt_every": 0, "log_every": 100, "tensorboard": False,
         "ema": {"kind": "none"}, "lr_schedule": "cosine"}  # fmt: skip
    return {"name": out.name, "out_dir": str(out), "model": MLP, "train": t, **sections}


def reflow(out, couplings, steps, base=None, **fewstep):
    d = train_cfg(out, steps, objective="reflow", data={"name": "couplings", "path": str(couplings)},
                  diffusion={"recipe": "rectified_flow"}, fewstep=fewstep,
                  sample={"sampler": "flow_euler", "steps": 1, "n": 16})  # fmt: skip
    if base is not None:
        d["finetune"] = {"base": str(base)}
    Trainer(config_from_dict(d), progress=False).fit()
    return find_latest(out / "checkpoints")


def weights_sha(ck):
    return json.loads((ck / "meta.json").read_text())["sha256"]["ema.safetensors"]


def one_step(den, noise):
    p = FlowProcess()
    return sample(den, process=p, sampler="flow_euler", steps=1, x_init=noise * p.prior_std()).samples.float()


def test_reflow_rounds_straighten_the_exact_flow_and_one_step_approaches_the_floor(tmp_path):
    """Liu et al. 2022 on a nine-mode mixture: couplings of the exact flow's ODE → 2-rectified flow → its couplings →
    3-rectified flow; straightness falls every round, one Euler step lands near the two-sample floor."""
    p = FlowProcess()
    generate_couplings(GRID, p, (2,), tmp_path / "c1", n=4096, sampler="flow_heun", steps=40, shard_size=1024)
    rf2 = reflow(tmp_path / "rf2", tmp_path / "c1", 800)
    m2 = load(rf2)
    teacher = {"teacher": str(rf2), "teacher_sha256": weights_sha(rf2)}
    generate_couplings(m2.denoiser, p, (2,), tmp_path / "c2", 4096, "flow_heun", 40, shard_size=1024, teacher=teacher)
    rf3 = reflow(tmp_path / "rf3", tmp_path / "c2", 400, base=rf2)
    distilled = reflow(tmp_path / "rf2d", tmp_path / "c2", 400, base=rf2, distill_steps=1)

    noise = torch.randn(8000, 2, generator=torch.Generator().manual_seed(5))
    ref = GRID.sample(8000, torch.Generator().manual_seed(1))[0].float()
    floor = sliced_wasserstein(GRID.sample(8000, torch.Generator().manual_seed(2))[0].float(), ref)
    straight = [path_straightness(m, p, noise[:2000])["straightness"] for m in (GRID, m2.denoiser, load(rf3).denoiser)]
    assert straight[0] > 100 * straight[1] and straight[1] > straight[2], straight
    sw = {k: sliced_wasserstein(one_step(m, noise.double() if k == "exact" else noise), ref)
          for k, m in (("exact", GRID), ("2-rf", m2.denoiser), ("3-rf", load(rf3).denoiser),
                       ("2-rf+distill", load(distilled).denoiser))}  # fmt: skip
    assert sw["exact"] > 10 * floor  # one step of the curved exact flow collapses onto the mean
    assert all(sw[k] < 2.0 * floor for k in ("2-rf", "3-rf", "2-rf+distill")), (sw, floor, straight)


def test_consistency_distillation_of_the_exact_mixture_samples_in_one_step(tmp_path):
    """Consistency distillation (Song et al. 2023, the original settings: N = 18, uniform n, μ = 0.95, l2) from the
    exact denoiser of the digits-toy mixture: one and two steps land near the two-sample floor."""
    gm = GaussianMixture.grid_2d(3, 1.0, 0.1)  # the distribution of data toy:mixture
    d = train_cfg(tmp_path / "cd", 1000, objective="consistency", data={"name": "toy:mixture", "num_samples": 20000},
                  diffusion={"recipe": "edm"}, sample={"sampler": "consistency", "steps": 1, "n": 16},
                  fewstep={"mode": "train", "curriculum": False, "s0": 17, "n_sampling": "uniform",
                           "weighting": "uniform", "target_decay": 0.95})  # fmt: skip
    d["train"]["lr"] = 1e-3
    cfg = resolve_base(config_from_dict(d))[0]  # the teacher is exact, not a checkpoint: handed to the objective
    obj = ConsistencyObjective.from_config(cfg, (2,), teacher=gm)
    Trainer(cfg, progress=False, objective=obj).fit()
    ref = gm.sample(8000, torch.Generator().manual_seed(1))[0].float()
    floor = sliced_wasserstein(gm.sample(8000, torch.Generator().manual_seed(2))[0].float(), ref)
    den = load(find_latest(tmp_path / "cd" / "checkpoints")).denoiser
    assert den.consistency  # the saved config keeps the boundary condition
    one, two = (sliced_wasserstein(sample(den, (8000, 2), den.process, "consistency", k, seed=3).samples, ref)
                for k in (1, 2))  # fmt: skip
    teacher_one_step = sliced_wasserstein(sample(gm, (8000, 2), den.process, "euler", 1, seed=3).samples.float(), ref)
    assert one < 4 * floor and two < 4 * floor and one < teacher_one_step / 5, (one, two, floor, teacher_one_step)


def test_couplings_resume_bitwise_and_refuse_mixing(tmp_path):
    p = FlowProcess()
    args = dict(n=10, sampler="flow_euler", steps=3, shard_size=4, num_classes=3)
    generate_couplings(GRID, p, (2,), tmp_path / "a", **args)
    generate_couplings(GRID, p, (2,), tmp_path / "b", **args, max_shards=1)  # interrupted after one shard
    assert sorted(f.name for f in (tmp_path / "b").iterdir()) == ["couplings.json", "shard_00000.safetensors"]
    generate_couplings(GRID, p, (2,), tmp_path / "b", **args)
    for i in range(3):
        name = f"shard_{i:05d}.safetensors"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    last = load_file(tmp_path / "a" / "shard_00002.safetensors")
    assert last["x"].shape == (2, 2) and last["y"].tolist() == [8 % 3, 9 % 3]
    own = torch.randn((2, 2), generator=torch.Generator().manual_seed(shard_seed(0, 2)))  # each shard its own seed
    assert torch.equal(last["noise"], own) and shard_seed(0, 1) != shard_seed(0, 2) != shard_seed(1, 2)
    x = sample(GRID, process=p, sampler="flow_euler", steps=3, x_init=own * p.prior_std(), cond=last["y"]).samples
    assert torch.allclose(last["x"], x.float())  # the ODE's end point from that noise
    with pytest.raises(DataError, match="other settings \\(steps\\)"):
        generate_couplings(GRID, p, (2,), tmp_path / "a", **{**args, "steps": 4})
    from sdeflow import EDMProcess

    with pytest.raises(DataError, match="not 'flow'"):
        generate_couplings(GRID, EDMProcess(), (2,), tmp_path / "c", **args)
    with pytest.raises(DataError, match="deterministic"):
        generate_couplings(GRID, p, (2,), tmp_path / "c", **{**args, "sampler": "euler_maruyama"})
    (tmp_path / "a" / "shard_00001.safetensors").unlink()
    cfg = config_from_dict(reflow_like(tmp_path / "r", tmp_path / "a"))
    with pytest.raises(DataError, match="1 of 3 shards missing"):
        Trainer(cfg, progress=False)


def reflow_like(out, couplings):
    return train_cfg(out, 2, objective="reflow", data={"name": "couplings", "path": str(couplings)},
                     diffusion={"recipe": "rectified_flow"})  # fmt: skip


def test_fewstep_config_and_teacher_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.name couplings"):
        config_from_dict({**reflow_like(tmp_path / "r", tmp_path), "data": {"name": "toy:moons"}})
    with pytest.raises(ConfigError, match="sdeflow schedule"):  # a grid belongs to trained weights
        config_from_dict({"sample": {"schedule": "optimized"}})
    with pytest.raises(ConfigError, match="set finetune.base"):
        config_from_dict(train_cfg(tmp_path / "c", 2, objective="consistency", data={"name": "toy:moons"}))
    generate_couplings(GRID, FlowProcess(), (2,), tmp_path / "c1", n=64, steps=2, shard_size=64)
    edm = train_cfg(tmp_path / "edm", 2, data={"name": "toy:moons"}, diffusion={"recipe": "edm"})
    Trainer(config_from_dict(edm), progress=False).fit()
    edm_ck = find_latest(tmp_path / "edm" / "checkpoints")
    with pytest.raises(ConfigError, match="reflow straightens a flow: finetune.base"):
        reflow(tmp_path / "r1", tmp_path / "c1", 2, base=edm_ck)
    flow = reflow(tmp_path / "flow", tmp_path / "c1", 2)
    generate_couplings(GRID, FlowProcess(), (2,), tmp_path / "c2", n=64, steps=2, shard_size=64,
                       teacher={"teacher": "elsewhere", "teacher_sha256": "0" * 64})  # fmt: skip
    with pytest.raises(ConfigError, match="drawn by another model"):
        reflow(tmp_path / "r2", tmp_path / "c2", 2, base=flow)
    generate_couplings(GaussianMixture(torch.zeros(1, 3), 1.0), FlowProcess(), (3,), tmp_path / "c3d", n=8, steps=2)
    with pytest.raises(ConfigError, match=r"trained on data of shape \(2,\).*has shape \(3,\)"):
        reflow(tmp_path / "r3", tmp_path / "c3d", 2, base=flow)
    assert cli_main(["reflow", str(edm_ck), "--out", str(tmp_path / "c3"), "--n", "8", "--device", "cpu"]) == 2


def test_posthoc_ema_in_training_resume_and_cli(tmp_path, capsys):
    """The run's own EMA tracks σ_rel = 0.075 directly; `sdeflow ema` rebuilds it from the 0.05 and 0.10 snapshots
    (every 5 steps) to 1e-4; a killed and resumed run writes the same snapshots."""
    d = train_cfg(tmp_path / "a", 60, data={"name": "toy:moons", "num_samples": 512}, diffusion={"recipe": "edm"})
    d["train"].update(ema={"kind": "power", "std": 0.075, "posthoc": [0.05, 0.10], "posthoc_every": 5},
                      ckpt_every=20, batch_size=64)  # fmt: skip
    b = json.loads(json.dumps(d))
    b["out_dir"] = str(tmp_path / "b")
    kill_and_resume(config_from_dict(d), config_from_dict(b), stop_after=30)
    snaps = sorted(f.name for f in (tmp_path / "a" / "ema_snapshots").iterdir())
    assert snaps == sorted(f.name for f in (tmp_path / "b" / "ema_snapshots").iterdir()) and len(snaps) == 24
    a_dir, b_dir = tmp_path / "a" / "ema_snapshots", tmp_path / "b" / "ema_snapshots"
    assert all((a_dir / f).read_bytes() == (b_dir / f).read_bytes() for f in snaps)
    capsys.readouterr()
    assert cli_main(["ema", str(tmp_path / "a"), "--sigma-rel", "0.075,0.1"]) == 0
    rows = json.loads(capsys.readouterr().out)
    direct = load_checkpoint(find_latest(tmp_path / "a" / "checkpoints"))["ema"]
    rebuilt = load_checkpoint(rows[0]["checkpoint"])["ema"]
    for k, v in direct.items():
        assert float((rebuilt[k] - v).norm() / v.norm().clamp_min(1e-12)) < 1e-4, k
    assert load(rows[1]["checkpoint"]).step == 60  # a complete checkpoint that sampling reads
    assert cli_main(["ema", str(tmp_path / "a"), "--sigma-rel", "0.25"]) == 2
    assert "outside the reach" in capsys.readouterr().err


def test_schedule_command_stores_a_grid_that_sample_uses(tmp_path, capsys):
    over = [f"out_dir={tmp_path / 'r'}", "train.steps=2", "train.batch_size=8", "sample.n=4", "sample.steps=2",
            "train.tensorboard=false"]  # fmt: skip
    cfg = load_config("configs/digits_edm.yaml", over)
    Trainer(cfg, progress=False).fit()
    ck = find_latest(tmp_path / "r" / "checkpoints")
    args = ["schedule", str(ck), "--sampler", "dpmpp_2m", "--steps", "3", "--n", "8", "--reference-steps", "16",
            "--sweeps", "1", "--device", "cpu"]  # fmt: skip
    assert cli_main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rmse_optimized"] <= out["rmse_start"]
    m = load(ck)
    assert m.denoiser.optimized_schedules["dpmpp_2m:3"] == pytest.approx(out["sigmas"], rel=1e-4)
    res = sample(m.denoiser, (2, *m.data_shape), m.process, "dpmpp_2m", 3, "optimized", seed=0)
    assert res.sigmas.tolist() == m.denoiser.optimized_schedules["dpmpp_2m:3"]
    assert cli_main(["sample", str(ck), "--schedule", "optimized", "--steps", "3", "--sampler", "dpmpp_2m",
                     "--n", "2", "--out", str(tmp_path / "s"), "--device", "cpu"]) == 0  # fmt: skip
    capsys.readouterr()
    assert cli_main(["sample", str(ck), "--schedule", "optimized", "--steps", "4", "--n", "2", "--out",
                     str(tmp_path / "s"), "--device", "cpu"]) == 2  # fmt: skip
    assert "sdeflow schedule" in capsys.readouterr().err
    table = json.loads((ck / "schedules.json").read_text())
    table["dpmpp_2m:3"]["weights_sha256"] = "0" * 64  # a grid belongs to the weights it was fitted to
    (ck / "schedules.json").write_text(json.dumps(table))
    assert load(ck).denoiser.optimized_schedules == {}


def test_distillation_regresses_d_at_the_euler_samplers_noise_levels(tmp_path):
    """k = 2 on a flow (shift 1): the 2-step Euler sampler evaluates D at t = t_max and t = 1/2, i.e. σ = t/(1 − t) =
    9999 and 1; the loss is the mean distance of D(x + σ ε; σ) to the coupled x at the drawn level."""
    from sdeflow.training.reflow import ReflowObjective
    from sdeflow.training.stream import Batch

    generate_couplings(GRID, FlowProcess(), (2,), tmp_path / "c", n=16, steps=2, shard_size=16)
    d = train_cfg(tmp_path / "r", 2, objective="reflow", data={"name": "couplings", "path": str(tmp_path / "c")},
                  diffusion={"recipe": "rectified_flow"}, fewstep={"distill_steps": 2})  # fmt: skip
    obj = ReflowObjective.from_config(config_from_dict(d), (2,))
    t_max = FlowProcess().t_max
    assert obj.levels.tolist() == pytest.approx([t_max / (1 - t_max), 1.0], rel=1e-5)
    x, noise = torch.randn(4, 2), torch.randn(4, 2)
    g = torch.Generator().manual_seed(3)
    batch = Batch(x, None, g, 4, slice(0, 4), noise=noise)
    pick = (torch.rand(4, generator=torch.Generator().manual_seed(3)) * 2).long()
    sigma = obj.levels[pick]
    with torch.no_grad():
        by_hand = (obj.denoiser(x + sigma[:, None] * noise, sigma) - x).square().mean(1).mean()
        assert float(obj.loss(batch, "model")) == pytest.approx(float(by_hand), rel=1e-5)
