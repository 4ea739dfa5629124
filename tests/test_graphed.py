"""train.cuda_graph: the captured step's inputs, warm-up and restore, on the CPU with a stand-in for the graph
(replay re-runs the captured step on the same static buffers); the real capture is in test_cuda.py."""

import pytest
import torch

from sdeflow.config import ConfigError
from sdeflow.training import Trainer
from sdeflow.training.ema import EMA
from sdeflow.training.graphed import GraphedStep, _Rerun
from test_training import _cfg as training_cfg

CAPTURES = []


def _capture(body):
    CAPTURES.append(body)
    return _Rerun(body)


def _cfg(tmp_path, name, *extra):
    """test_training's run (two micro-batches, dropout, label dropout, warm-up + cosine LR, power EMA), five
    steps, with a clipping threshold small enough to act at every step."""
    return training_cfg(tmp_path, "train.steps=5", "train.ckpt_every=3", "train.grad_clip=0.05", "train.lr=3e-3",
                        *extra, name=name)  # fmt: skip


def _graphed(cfg, **kw):
    tr = Trainer(cfg, progress=False, **kw)
    tr.graphed = GraphedStep(tr, capture=_capture)
    return tr


def _state(tr):
    return {k: v.clone() for k, v in tr.objective.state_dict().items()}  # network and EMA


@pytest.mark.parametrize("ema", ["{kind: power, std: 0.1}", "{kind: fixed, decay: 0.9, start_step: 2}"])
def test_graphed_steps_equal_eager_steps_bitwise(tmp_path, ema):
    """Five steps replayed from the captured step give the eager steps' losses, weights, EMA and LR schedule
    exactly: the same rows, σ, ε, flips, label dropout and dropout masks, the LR the schedule fills in, the
    EMA's β computed on the device, and the warm-up step undone."""
    a = Trainer(_cfg(tmp_path, "a", f"train.ema={ema}"), progress=False)
    a.fit()
    CAPTURES.clear()
    b = _graphed(_cfg(tmp_path, "b", f"train.ema={ema}"))
    b.fit()
    assert len(CAPTURES) == 1  # captured once, replayed five times
    assert a.losses == b.losses
    sa, sb = _state(a), _state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert b.phases["model"].scheduler.get_last_lr() == a.phases["model"].scheduler.get_last_lr()


def test_graphed_checkpoint_resumes_eagerly_and_graphed(tmp_path):
    """A graphed run's checkpoint (device LR tensors made plain) resumes as an eager run and as a graphed one
    (the warm-up before capture restores the resumed optimizer moments), both equal to the uninterrupted run."""
    full = Trainer(_cfg(tmp_path, "full"), progress=False)
    full.fit()
    with pytest.raises(KeyboardInterrupt):
        _graphed(_cfg(tmp_path, "g"), stop_after=3).fit()  # checkpoint at step 3
    saved = torch.load(tmp_path / "g/checkpoints/step_00000003/state.pt", weights_only=True)
    group = saved["optimizers"]["model"]["param_groups"][0]
    assert isinstance(group["lr"], float) and group["capturable"] is False
    eager = Trainer(_cfg(tmp_path, "g"), resume=True, progress=False)
    eager.fit()
    assert eager.losses == full.losses
    with pytest.raises(KeyboardInterrupt):
        _graphed(_cfg(tmp_path, "h"), stop_after=3).fit()
    graphed = _graphed(_cfg(tmp_path, "h"), resume=True)
    graphed.fit()
    assert graphed.losses == full.losses
    sf, sg = _state(full), _state(graphed)
    assert all(torch.equal(sf[k], sg[k]) for k in sf)


@pytest.mark.parametrize("kind,kw", [("fixed", {"decay": 0.99, "start_step": 3}), ("power", {"std": 0.05})])
def test_ema_beta_on_the_device_equals_the_host_value(kind, kw):
    ema = EMA(torch.nn.Linear(2, 2), kind, **kw)
    for step in range(1, 9):
        on_device = ema.beta(torch.tensor(float(step), dtype=torch.float64))
        assert float(on_device) == pytest.approx(ema.beta(step), abs=1e-15)
    assert float(ema.beta(torch.tensor(3.0))) == (0.0 if kind == "fixed" else pytest.approx((2 / 3) ** (ema.gamma + 1)))


def test_cuda_graph_refusals_name_the_setting(tmp_path):
    with pytest.raises(ConfigError, match=r"train.cuda_graph needs a CUDA device \(this run trains on cpu\)"):
        Trainer(_cfg(tmp_path, "cpu", "train.cuda_graph=true", "train.device=cpu"), progress=False)
    for extra, what in [
        ("train.precision=fp16", "train.precision fp16"),
        ("train.optimizer=sgd", "train.optimizer 'sgd'"),
        ("train.parallel={strategy: fsdp}", "train.parallel.strategy 'fsdp'"),
    ]:
        with pytest.raises(ConfigError, match=f"train.cuda_graph does not support {what}"):
            _cfg(tmp_path, "x", "train.cuda_graph=true", extra)
    with pytest.raises(ConfigError, match="compile_mode 'reduce-overhead'"):
        _cfg(tmp_path, "x", "train.cuda_graph=true", "train.compile=true", "train.compile_mode=reduce-overhead")
    cfg = _cfg(tmp_path, "gan", "objective=gan")
    from sdeflow.training.objectives import build_objective  # noqa: F401  (the objective registry)

    tr = Trainer(cfg, progress=False)
    with pytest.raises(ConfigError, match="an objective whose step has fixed shapes .*'gan'"):
        GraphedStep(tr, capture=_capture)
