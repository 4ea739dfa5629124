"""Every user error gets one message and an exit code, never a traceback, and leaves what was saved untouched."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from sdeflow.checkpoint import find_latest
from sdeflow.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--set", "data.name=digits",
    "--set", "model.kind=unet",
    "--set", "model.preset=small",
    "--set", "model.num_classes=10",
    "--set", "model.kwargs={model_channels: 8}",
    "--set", "train.steps=2",
    "--set", "train.batch_size=8",
    "--set", "train.ckpt_every=0",
    "--set", "train.tensorboard=false",
    "--set", "sample.n=2",
    "--set", "sample.steps=2",
]  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A trained run, its checkpoint, a corrupted copy, a copy with non-finite weights, and config files."""
    from safetensors.torch import load_file, save_file

    from sdeflow.checkpoint import _sha256

    tmp = tmp_path_factory.mktemp("errors")
    cfg = tmp / "run.yaml"
    cfg.write_text((ROOT / "configs" / "digits_edm.yaml").read_text())
    assert main(["train", str(cfg), "--out", str(tmp / "run"), "--quiet", *TINY]) == 0
    ck = find_latest(tmp / "run" / "checkpoints")
    corrupt = tmp / "corrupt"
    shutil.copytree(ck, corrupt)
    data = bytearray((corrupt / "ema.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (corrupt / "ema.safetensors").write_bytes(bytes(data))
    nonfinite = tmp / "nonfinite"
    shutil.copytree(ck, nonfinite)
    w = load_file(nonfinite / "ema.safetensors")
    w[next(iter(w))] = torch.full_like(w[next(iter(w))], float("nan"))
    save_file(w, nonfinite / "ema.safetensors")
    meta = json.loads((nonfinite / "meta.json").read_text())
    meta["sha256"]["ema.safetensors"] = _sha256(nonfinite / "ema.safetensors")  # a run that saved NaN weights
    (nonfinite / "meta.json").write_text(json.dumps(meta))
    incomplete = tmp / "incomplete"
    shutil.copytree(ck, incomplete)
    (incomplete / "meta.json").unlink()
    (tmp / "bad.yaml").write_text("train: [1, 2")
    (tmp / "list.yaml").write_text("- 1\n- 2\n")
    return {"tmp": tmp, "cfg": cfg, "run": tmp / "run", "ck": ck, "corrupt": corrupt, "nonfinite": nonfinite,
            "incomplete": incomplete}  # fmt: skip


def _train(*extra):
    return ["train", "{cfg}", "--out", "{tmp}/new", "--quiet", *TINY, *extra]


S = ["sample", "{ck}", "--out", "{tmp}/s", "--steps", "2", "--n", "2"]
CASES = [  # (argv, exit code, what the message must name)
    (["train", "{tmp}/missing.yaml"], 2, "config file not found"),
    (["train", "{tmp}/bad.yaml"], 2, "not valid YAML"),
    (["train", "{tmp}/list.yaml"], 2, "must hold a mapping"),
    (_train("--set", "train.lrr=1"), 2, "unknown config key 'train.lrr'"),
    (_train("--set", "train.steps=many"), 2, "train.steps: expected an integer"),
    (_train("--set", "train.steps=0"), 2, "train.steps must be >= 1"),
    (_train("--set", "train.precision=fp8"), 2, "train.precision must be one of"),
    (_train("--set", "sample.sampler=eulr"), 2, "sample.sampler must be one of"),
    (_train("--set", "sample.steps=0"), 2, "sample.steps must be >= 1"),
    (_train("--set", "sample.schedule=wobbly"), 2, "sample.schedule must be one of"),
    (_train("--set", "diffusion.recipe=ddpn"), 2, "diffusion.recipe must be one of"),
    (_train("--set", "diffusion.process_kwargs={sigma_maxx: 3}"), 2, "diffusion.process_kwargs do not fit"),
    (_train("--set", "model.kind=resnet"), 2, "model.kind must be one of"),
    (_train("--set", "model.kwargs={widht: 3}"), 2, "model.kwargs do not fit"),
    (_train("--set", "data.name=cifar10"), 2, "data.path is required"),
    (_train("--set", "data.name=npz", "--set", "data.path={tmp}/none.npz"), 2, "none.npz"),
    (_train("--set", "data.name=image_folder", "--set", "data.path={tmp}/nofolder"), 2, "nofolder"),
    (_train("--set", "data.resolution=1"), 2, "data.resolution must be >= 2"),
    (_train("--set", "train.ema={decay: 1.5}"), 2, "train.ema.decay must lie in [0, 1)"),
    (_train("--set", "train.ema={kind: power, std: 0.5}"), 2, "train.ema.std must lie in"),
    (_train("--set", "train.lr=-1"), 2, "train.lr must be >= 0"),
    (_train("--set", "train.label_dropout=1"), 2, "train.label_dropout must lie in [0, 1)"),
    (_train("--set", "train.batch_size=15", "--set", "train.grad_accum=2"), 2, "divisible by train.grad_accum"),
    (_train("--set", "train.optimizer=adamm"), 2, "unknown torch optimizer 'adamm'"),
    (_train("--set", "noequals"), 2, "not of the form section.key=value"),
    (_train("--set", "text.encoder=minilm"), 2, "text.encoder and model.num_classes exclude each other"),
    (_train("--set", "text.max_length=0"), 2, "text.max_length must be >= 1"),
    (_train("--set", "model.num_classes=0", "--set", "text.encoder=minilm"), 2, "needs a captioned dataset"),
    (_train("--set", "model.kind=mmdit", "--set", "model.num_classes=0"), 2, "'mmdit' is text-conditioned"),
    (_train("--set", "data.name=shapes", "--set", "data.horizontal_flip=true"), 2, "contradict the captions"),
    (_train("--set", "data.name=shapes", "--set", "data.split=test"), 2, "data.split must be one of"),
    (
        _train("--set", "data.name=shapes", "--set", "model.num_classes=0", "--set", "text.encoder={tmp}/noenc"),
        2,
        "text.encoder: text encoder folder",
    ),
    (
        _train(
            "--set",
            "data.name=shapes",
            "--set",
            "model.num_classes=0",
            "--set",
            "text.encoder=minilm",
            "--set",
            "model.kind=dit",
            "--set",
            "model.preset=null",
        ),
        2,
        "model.kind 'dit' takes no text",
    ),
    (["train", "{cfg}", "--out", "{run}", "--quiet", *TINY], 2, "already holds a run"),
    (["train", "{cfg}", "--out", "{run}", "--quiet", "--resume", "{nonfinite}", *TINY], 2, "would mix the two runs"),
    (["train", "{cfg}", "--out", "{tmp}/new", "--quiet", "--resume", "{nonfinite}", *TINY], 2, "non-finite weights"),
    (["train", "{cfg}", "--out", "{run}", "--quiet", "--resume", *TINY, "--set", "train.lr=1e-3"], 2, "train.lr"),
    (["train", "{cfg}", "--out", "/proc/sdeflow_run", "--quiet", *TINY], 2, "cannot write to the run folder"),
    (["sample", "{ck}", "--out", "{tmp}/s", "--steps", "0"], 2, "--steps: expected a whole number >= 1"),
    ([*S, "--n", "0"], 2, "--n: expected a whole number >= 1"),
    ([*S, "--n", "lots"], 2, "--n: expected a whole number"),
    ([*S, "--sampler", "eulr"], 2, "--sampler: invalid choice: 'eulr'"),
    ([*S, "--schedule", "wobbly"], 2, "--schedule: invalid choice"),
    ([*S, "--schedule", "leading"], 2, "discrete process"),
    ([*S, "--cfg", "2", "--cfg-interval", "5,1"], 2, "--cfg-interval: expected 0 <= a < b"),
    ([*S, "--cfg", "2", "--cfg-interval", "x"], 2, "--cfg-interval: expected 'a,b'"),
    ([*S, "--class", "12"], 2, "--class must lie in [0, 10)"),
    ([*S, "--prompt", "a red circle"], 2, "need a text-to-image model; this one is class-conditional"),
    ([*S, "--negative-prompt", "blue"], 2, "need a text-to-image model"),
    ([*S, "--device", "banana"], 2, "--device: not a device"),
    ([*S, "--cast-weights"], 2, "--cast-weights needs --precision"),
    ([*S, "--cuda-graphs"], 2, "--cuda-graphs needs"),
    (["sample", "{tmp}/nowhere", "--out", "{tmp}/s"], 2, "checkpoint not found"),
    (["sample", "{incomplete}", "--out", "{tmp}/s"], 2, "not a complete checkpoint (no meta.json)"),
    (["sample", "{corrupt}", "--out", "{tmp}/s"], 2, "corrupted checkpoint file"),
    (["sample", "{nonfinite}", "--out", "{tmp}/s"], 2, "non-finite weights"),
    (["eval", "{ck}", "--nfe", "0,5", "--out", "{tmp}/e"], 2, "--nfe: expected a whole number >= 1"),
    (["eval", "{ck}", "--samplers", "heun,bogus", "--out", "{tmp}/e"], 2, "unknown ['bogus']"),
    (["eval", "{ck}", "--n", "-3", "--out", "{tmp}/e"], 2, "--n: expected a whole number >= 1"),
    (["nll", "{ck}", "--levels", "1"], 2, "--levels: expected 0 (continuous) or >= 2 levels"),
    (["nll", "{ck}", "--tol", "0"], 2, "--tol: expected a finite number > 0"),
    (["demo", "--steps", "0", "--out", "{tmp}/d"], 2, "--steps: expected a whole number >= 1"),
]


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize(("argv", "code", "message"), CASES, ids=[f"{i:02d}" for i in range(len(CASES))])
def test_bad_input_gets_one_message_and_changes_nothing(world, argv, code, message, capsys):
    for key, value in world.items():
        argv = [a.replace("{" + key + "}", str(value)) for a in argv]
    before = _snapshot(world["run"])
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own refusal: usage line and one message
        rc = e.code
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err
    assert message in err, err
    assert _snapshot(world["run"]) == before


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40


def test_debug_shows_the_traceback(world):
    with pytest.raises(Exception, match="checkpoint not found"):
        main(["--debug", "sample", str(world["tmp"] / "nowhere")])


def test_overwrite_moves_the_old_run_aside(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    before = _snapshot(run)
    assert main(["train", str(world["cfg"]), "--out", str(run), "--quiet", "--overwrite", *TINY]) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and _snapshot(aside[0]) == before
    assert json.loads((run / "summary.json").read_text())["checkpoint"].startswith(str(run))
