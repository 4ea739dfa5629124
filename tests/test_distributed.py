"""Several processes on one machine (gloo on the CPU, as torchrun would start them): DDP and FSDP2 training equal
one process on the same global batch; sharded checkpoints resume on another world size and export to the
single-file kind; activation checkpointing changes memory, not the maths."""

import os
import pickle
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp

import sdeflow
from sdeflow.checkpoint import CheckpointError, export_checkpoint, find_latest, load_checkpoint, read_sharded
from sdeflow.config import ConfigError, load_config
from sdeflow.errors import RunFolderError
from sdeflow.sampling import sample
from sdeflow.training import Trainer
from sdeflow.training.sharding import blocks, checkpoint_blocks

BASE = [
    "data.name=digits",
    "model.kind=unet",
    "model.preset=small",
    "model.kwargs={model_channels: 16}",
    "diffusion.recipe=edm",
    "train.batch_size=16",
    "train.lr=1e-3",
    "train.tensorboard=false",
    "train.device=cpu",
    "train.ema={kind: power, std: 0.1}",
    "sample.n=4",
    "sample.steps=2",
]
SGD = ["train.optimizer=sgd", "train.lr=0.05"]  # updates linear in the gradients: a wrong reduction shows at once
DRAW = (4, 7)  # n, seed of the samples the workers draw from the EMA at the end


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, overrides, result, resume, stop_after):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    tr = Trainer(load_config(None, overrides), progress=False, resume=resume, stop_after=stop_after)
    try:
        tr.fit()
    except KeyboardInterrupt:  # stop_after: killed after a checkpoint
        pass
    drawn = tr.objective.generate(*DRAW)[0]  # every rank together when the EMA is sharded
    if rank == 0:
        torch.save({"losses": tr.losses, "samples": drawn}, result)
    tr.close()
    assert not dist.is_initialized()


def _spawn(world, out, *extra, resume=False, stop_after=None):
    """Train in ``world`` fresh processes (torchrun's environment); rank 0's losses and EMA samples."""
    result = out.parent / f"{out.name}_{world}_{int(bool(resume))}.pt"
    args = (world, _free_port(), [*BASE, f"out_dir={out}", *extra], str(result), resume, stop_after)
    mp.spawn(_worker, args=args, nprocs=world, join=True)
    return torch.load(result, weights_only=True)


def _single(out, *extra):
    tr = Trainer(load_config(None, [*BASE, f"out_dir={out}", *extra]), progress=False)
    tr.fit()
    return tr


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """Two FSDP2 ranks, 3 steps of 2 micro-batches, and one process on the same global batches."""
    root = tmp_path_factory.mktemp("fsdp")
    steps = ["train.steps=3", "train.grad_accum=2", "train.ckpt_every=0", *SGD]
    run = _spawn(2, root / "fsdp", *steps, "train.parallel.strategy=fsdp")
    return root, run, _single(root / "single", *steps)


def _assert_weights_equal(ck, single, atol=1e-5):
    for name, module in (("model", single.objective.net), ("ema", single.objective.ema.model)):
        own = module.state_dict()
        assert set(ck[name]) == set(own)
        for k, v in own.items():
            torch.testing.assert_close(ck[name][k], v, rtol=1e-4, atol=atol, msg=lambda m, w=f"{name} {k}": f"{w}: {m}")


def test_fsdp_two_ranks_equal_one_process(fsdp_run):
    """Sharded parameters, reduce-scattered gradients (synchronised on the last micro-batch only), sharded Adam
    moments and a sharded EMA give the updates of one process on the whole batch."""
    root, run, single = fsdp_run
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(single.losses), rtol=1e-5, atol=1e-6)
    ck = load_checkpoint(find_latest(root / "fsdp" / "checkpoints"))
    assert ck["meta"]["sharded"] and ck["meta"]["world_size"] == 2
    assert sorted(p.name for p in (ck["path"] / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    _assert_weights_equal(ck, single)


@pytest.mark.parametrize("accum", [1, 2])
def test_ddp_equals_one_process(tmp_path, accum):
    """DDP on 2 ranks, gradients in the all-reduce buckets: with one micro-batch a static graph, with two no
    all-reduce before the last."""
    steps = ["train.steps=3", f"train.grad_accum={accum}", "train.ckpt_every=0", *SGD]
    run = _spawn(2, tmp_path / "ddp", *steps)
    single = _single(tmp_path / "single", *steps)
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(single.losses), rtol=1e-5, atol=1e-6)
    _assert_weights_equal(load_checkpoint(find_latest(tmp_path / "ddp" / "checkpoints")), single)


def test_sharded_export_samples_the_same_images(fsdp_run, tmp_path):
    """The sharded run's EMA, sampled by both ranks together, and its single-file export sampled in one process
    draw the same images; so does the one-process run."""
    root, run, single = fsdp_run
    exported = export_checkpoint(find_latest(root / "fsdp" / "checkpoints"), tmp_path / "export")
    assert sorted(p.name for p in exported.iterdir()) == [
        "ema.safetensors",
        "meta.json",
        "model.safetensors",
        "state.pt",
    ]
    source = find_latest(root / "fsdp" / "checkpoints")
    for out in (tmp_path / "export", source.parent):  # again, or into the source's own folder: refused, nothing lost
        with pytest.raises(CheckpointError, match="already exists"):
            export_checkpoint(source, out)
    assert load_checkpoint(source)["meta"]["sharded"] and load_checkpoint(exported)["meta"]["exported_from"]
    m = sdeflow.load(exported)
    direct = sdeflow.load(find_latest(root / "fsdp" / "checkpoints"))  # sampling reads a sharded checkpoint too
    for (k, a), b in zip(m.denoiser.state_dict().items(), direct.denoiser.state_dict().values()):
        assert torch.equal(a, b), k
    s = single.cfg.sample
    res = sample(m.denoiser, (DRAW[0], *m.data_shape), m.recipe.process, s.sampler, s.steps, s.schedule,
                 seed=DRAW[1])  # fmt: skip
    torch.testing.assert_close(res.samples, run["samples"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(single.objective.generate(*DRAW)[0], run["samples"], rtol=1e-4, atol=1e-4)


def test_sharded_resume_on_other_world_sizes(tmp_path):
    """Killed after step 2 on 2 ranks, resumed on 1 and on 4 processes: the next losses and the final weights are
    those of one uninterrupted process (the same world size: the next test)."""
    steps = ["train.steps=4", "train.ckpt_every=2", "train.parallel.strategy=fsdp"]
    killed = _spawn(2, tmp_path / "run", *steps, stop_after=2)
    assert len(killed["losses"]) == 2
    single = _single(tmp_path / "single", "train.steps=4", "train.ckpt_every=2")
    for world in (1, 4):
        out = tmp_path / f"resumed{world}"
        shutil.copytree(tmp_path / "run", out)
        resumed = _spawn(world, out, *steps, resume=True)
        torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(single.losses), rtol=1e-5, atol=1e-6)
        ck = load_checkpoint(find_latest(out / "checkpoints"))
        assert ck["meta"]["step"] == 4 and ck["meta"]["world_size"] == world
        _assert_weights_equal(ck, single, atol=1e-4)  # Adam: a near-zero gradient's sign can differ in the last bit


def test_sharded_checkpoint_crash_mid_write_keeps_the_last(tmp_path, monkeypatch):
    """One FSDP process (a group of one rank): a write that fails after the shards went to disk leaves the previous
    checkpoint complete and no half-written folder among the checkpoints; the run resumes from it on the same world
    size and ends as an uninterrupted one-process run."""
    import torch.distributed.checkpoint as dcp

    args = [*BASE, f"out_dir={tmp_path / 'run'}", "train.steps=4", "train.ckpt_every=2", "train.parallel.strategy=fsdp"]
    tr = Trainer(load_config(None, args), progress=False)
    real, calls = dcp.save, []

    def failing(state, **kw):
        calls.append(1)
        real(state, **kw)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(dcp, "save", failing)
    try:
        with pytest.raises(OSError, match="No space"):
            tr.fit()
    finally:
        tr.close()
    folder = tmp_path / "run" / "checkpoints"
    assert [p.name for p in folder.iterdir()] == ["step_00000002"]
    monkeypatch.setattr(dcp, "save", real)
    resumed = Trainer(load_config(None, args), progress=False, resume=True)
    try:
        assert resumed.step == 2
        resumed.fit()
    finally:
        resumed.close()
    assert find_latest(folder).name == "step_00000004"
    single = _single(tmp_path / "single", "train.steps=4", "train.ckpt_every=2")
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(single.losses), rtol=1e-5, atol=1e-6)
    _assert_weights_equal(load_checkpoint(find_latest(folder)), single, atol=1e-4)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_sharded_index_refuses_code_and_tampering(fsdp_run, tmp_path, monkeypatch):
    root, _, _ = fsdp_run
    ck = tmp_path / "ck"
    shutil.copytree(find_latest(root / "fsdp" / "checkpoints"), ck)
    (ck / "sharded" / ".metadata").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError, match="SHA-256"):  # meta.json's checksums catch it first
        load_checkpoint(ck)
    monkeypatch.chdir(tmp_path)  # where the crafted command would write
    with pytest.raises(CheckpointError, match=r"may not name (posix|os)\.system"):
        read_sharded(ck, prefix="model")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "extra, named",
    [
        (["objective=gan"], "objective 'gan'"),
        (["train.precision=fp16"], "fp16"),
        (["train.ema.posthoc=[0.1]"], "posthoc"),
        (["train.parallel.strategy=zero"], "must be one of"),
    ],
)
def test_fsdp_refused_where_unsupported(extra, named):
    with pytest.raises(ConfigError, match=f"train.parallel.strategy.*{named}"):
        load_config(None, [*BASE, "train.parallel.strategy=fsdp", *extra])


def test_resume_with_another_strategy_is_refused(fsdp_run):
    root, _, _ = fsdp_run
    args = [*BASE, f"out_dir={root / 'fsdp'}", "train.steps=3", "train.grad_accum=2", "train.ckpt_every=0", *SGD]
    with pytest.raises(RunFolderError, match="train.parallel.strategy: 'fsdp' in the run, 'ddp' now"):
        Trainer(load_config(None, args), progress=False, resume=True)


def test_blocks_are_the_backbones_blocks():
    from sdeflow.builders import build_network
    from sdeflow.models.dit import DiTBlock
    from sdeflow.models.unet import UNetBlock

    unet = build_network(load_config(None, BASE).model, (1, 8, 8))
    found = blocks(unet)
    assert found and all(isinstance(b, UNetBlock) for b in found)
    assert len(found) == sum(isinstance(m, UNetBlock) for m in unet.modules())
    dit = build_network(load_config(None, ["model.kind=dit", "model.preset=DiT-S/2"]).model, (4, 8, 8))
    assert [type(b) for b in blocks(dit)] == [DiTBlock] * 12


def test_activation_checkpointing_recomputes_blocks_with_equal_gradients():
    """Each block runs forward twice per training step (once more in backward) and the gradients are unchanged."""
    from sdeflow.builders import build_network

    torch.manual_seed(0)
    net = build_network(load_config(None, BASE).model, (1, 8, 8))
    x, c = torch.randn(3, 1, 8, 8), torch.randn(3)
    runs = []
    for b in blocks(net):
        for layer in b.children():
            layer.register_forward_pre_hook(lambda *_: runs.append(1))
    net(x, c, None).square().mean().backward()
    plain, once, keys = {n: p.grad.clone() for n, p in net.named_parameters()}, len(runs), list(net.state_dict())
    net.zero_grad()
    checkpoint_blocks(net)
    net(x, c, None).square().mean().backward()
    assert once > 0 and len(runs) == 3 * once  # forward, then forward again inside backward
    assert list(net.state_dict()) == keys
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], rtol=1e-5, atol=1e-7, msg=n)
