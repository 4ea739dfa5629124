"""Flow layers against autograd: each layer's log-determinant equals log|det| of its Jacobian, and its inverse
undoes it to 1e-5."""

import pytest
import torch

from sdeflow.models.flows import ActNorm, Coupling, InvConv1x1, squeeze, unsqueeze

F64 = torch.float64
SHAPE = (2, 4, 2, 2)


def jacobian_logdet(layer, x):
    """log|det ∂y/∂x| per sample, from autograd's full Jacobian of each sample."""
    out = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0][0], xi)
        out.append(torch.linalg.slogdet(jac.reshape(xi.numel(), xi.numel()))[1])
    return torch.stack(out)


def randomised(layer):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer


def layers():
    g = torch.Generator().manual_seed(1)
    act = ActNorm(4).double()
    act(torch.randn(SHAPE, generator=g, dtype=F64) * 3 + 1)  # data-dependent init on the first batch
    return {
        "actnorm": act.eval(),
        "invconv": InvConv1x1(4, torch.Generator().manual_seed(2)).double(),
        "affine-channel": randomised(Coupling(4, 8, "affine", "channel").double()),
        "additive-channel": randomised(Coupling(4, 8, "additive", "channel").double()),
        "affine-checkerboard": randomised(Coupling(4, 8, "affine", "checkerboard").double()),
    }


@pytest.mark.parametrize("name", list(layers()))
def test_logdet_equals_autograd_and_inverse_undoes_the_layer(name):
    layer = layers()[name]
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=F64)
    y, logdet = layer(x)
    torch.testing.assert_close(logdet, jacobian_logdet(layer, x), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(layer.inverse(y), x, rtol=1e-5, atol=1e-5)
    if name == "additive-channel":  # NICE: volume-preserving
        torch.testing.assert_close(logdet, torch.zeros(2, dtype=F64))


def test_actnorm_initialises_to_zero_mean_unit_variance():
    x = torch.randn(64, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 5 + 2
    y, _ = ActNorm(3)(x)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std((0, 2, 3)), torch.ones(3), atol=1e-4, rtol=0)


def test_squeeze_is_a_permutation_and_its_own_inverse():
    x = torch.arange(2 * 3 * 4 * 4.0).reshape(2, 3, 4, 4)
    s = squeeze(x)
    assert s.shape == (2, 12, 2, 2) and torch.equal(unsqueeze(s), x)
    assert s[0, :4, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]  # the top-left 2×2 block of channel 0


def test_couplings_start_as_the_identity_and_check_their_options():
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    y, logdet = Coupling(4)(x)
    # σ(0 + 2) scale at initialisation: a fixed contraction of the transformed half, log det = 8·log σ(2)
    torch.testing.assert_close(y[:, :2], x[:, :2])
    torch.testing.assert_close(logdet, torch.full((2,), 8 * torch.nn.functional.logsigmoid(torch.tensor(2.0)).item()))
    for kwargs, message in (({"kind": "spline"}, "coupling kind"), ({"mask": "stripes"}, "coupling mask")):
        with pytest.raises(ValueError, match=message):
            Coupling(4, **kwargs)
    with pytest.raises(ValueError, match="even number of channels"):
        Coupling(3)


@pytest.mark.parametrize(("glow", "kind", "mask"), [(True, "affine", "channel"), (False, "additive", "channel"),
                                                     (False, "affine", "checkerboard")])  # fmt: skip
def test_whole_flow_log_prob_is_exact(glow, kind, mask):
    """log p(x) = Σ log N(z) + log|det ∂z/∂x|, with the determinant of the whole multi-scale map from autograd."""
    from sdeflow.models.flows import Flow

    torch.manual_seed(0)
    flow = randomised_all(Flow((1, 4, 4), levels=2, steps=2, hidden=8, kind=kind, mask=mask, glow=glow).double())
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(5), dtype=F64)
    flow.eval()
    zs, logdet = flow(x)

    def flat(v):
        return torch.cat([z.flatten(1) for z in flow(v[None])[0]], 1)[0]

    for i in range(2):
        jac = torch.autograd.functional.jacobian(flat, x[i])
        assert float(logdet[i]) == pytest.approx(float(torch.linalg.slogdet(jac.reshape(16, 16))[1]), abs=1e-8)
    z = torch.cat([z.flatten(1) for z in zs], 1)
    want = -0.5 * (z**2).sum(1) - 8 * torch.log(torch.tensor(2 * torch.pi, dtype=F64)) + logdet
    torch.testing.assert_close(flow.log_prob(x), want)
    torch.testing.assert_close(flow.inverse(zs), x, rtol=1e-5, atol=1e-5)


def randomised_all(flow):
    for layer in flow.modules():
        if isinstance(layer, Coupling):
            randomised(layer)
    return flow


def test_sampling_at_a_temperature_scales_the_latents():
    from sdeflow.models.flows import Flow

    flow = Flow((1, 4, 4), levels=2, steps=1, hidden=8).eval()
    x = flow.sample(3, temperature=0.5, generator=torch.Generator().manual_seed(1))
    assert x.shape == (3, 1, 4, 4)
    zs, _ = flow(x)
    g = torch.Generator().manual_seed(1)
    want = [0.5 * torch.randn((3, 2, 2, 2), generator=g), 0.5 * torch.randn((3, 8, 1, 1), generator=g)]
    for z, w in zip(zs, want, strict=True):
        torch.testing.assert_close(z, w, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="divisible by 2"):
        Flow((1, 6, 6), levels=2)
