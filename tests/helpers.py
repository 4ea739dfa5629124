"""Helpers shared by test modules."""

import pytest
import torch

from sdeflow.training import Trainer


def kill_and_resume(cfg_a, cfg_b, stop_after: int = 3):
    """Train ``cfg_a`` straight through, and ``cfg_b`` (the same run in another folder) killed after ``stop_after``
    steps and resumed from its last checkpoint; the losses and every weight must agree bit for bit. Returns
    (the straight trainer, the resumed one, the step it resumed from)."""
    a = Trainer(cfg_a, progress=False)
    a.fit()
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg_b, progress=False, stop_after=stop_after).fit()
    b = Trainer(cfg_b, resume=True, progress=False)
    resumed_at = b.step
    b.fit()
    assert a.losses == b.losses
    sa, sb = a.objective.state_dict(), b.objective.state_dict()
    assert sa.keys() == sb.keys()
    assert not [k for k in sa if not torch.equal(sa[k], sb[k])]
    return a, b, resumed_at


def group_norm_act_reference(x, groups, weight, bias, eps, pre=None, scale=None, shift=None, act=True):
    """silu((GN(x + pre)·γ + β)·(1 + scale) + shift) from PyTorch's own ``F.group_norm`` in fp32, ``pre``, ``scale``,
    ``shift`` (N, C): the answer sdeflow's fused GroupNorm kernels must give."""
    import torch.nn.functional as F

    u = x.float() if pre is None else x.float() + pre.float()[:, :, None, None]
    z = F.group_norm(u.contiguous(), groups, weight.float(), bias.float(), eps)
    if scale is not None:
        z = torch.addcmul(shift.float()[:, :, None, None], z, 1 + scale.float()[:, :, None, None])
    return F.silu(z) if act else z
