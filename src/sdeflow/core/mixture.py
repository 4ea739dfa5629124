"""Gaussian mixtures: data distributions whose noised marginals, denoisers and scores are exact.

For p(x0) = Σ_k w_k N(μ_k, diag(v_k)), the noised marginal at level σ is again a mixture,

    p(x̃; σ) = Σ_k w_k N(x̃; μ_k, diag(v_k + σ²)),

and the ideal denoiser (Karras et al. 2022, eq. 3) is the posterior-weighted mixture of the
per-component Wiener filters:

    D*(x̃; σ) = E[x0 | x̃] = Σ_k r_k(x̃) (μ_k + v_k/(v_k + σ²) · (x̃ − μ_k)),
    r_k(x̃) = w_k N(x̃; μ_k, v_k + σ²) / p(x̃; σ),
    ∇ log p(x̃; σ) = (D*(x̃; σ) − x̃) / σ².

Components carry class labels, so the class-conditional mixture (restricted to the components of
class y) and the exact noisy classifier p(y | x̃; σ) = Σ_{k: y_k = y} r_k(x̃) are available too.
A :class:`GaussianMixture` is a denoiser like any trained network: it plugs in wherever one does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .condition import NULL_LABEL

__all__ = ["NULL_LABEL", "GaussianMixture"]


class GaussianMixture:
    """A mixture of Gaussians with diagonal (or isotropic) covariances over data of shape ``event_shape``.

    Args:
        means: (K, *event_shape) component means.
        stds: per-component standard deviations: (K,) isotropic, or (K, *event_shape) diagonal.
        weights: (K,) mixture weights (normalised here); uniform if omitted.
        labels: (K,) integer class of each component; component index if omitted.
    """

    def __init__(
        self,
        means: Tensor,
        stds: Tensor | float,
        weights: Tensor | None = None,
        labels: Tensor | None = None,
    ):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim < 2:
            raise ValueError(f"means must have shape (K, *event_shape), got {tuple(means.shape)}")
        k = means.shape[0]
        self.event_shape = tuple(means.shape[1:])
        self.dim = int(math.prod(self.event_shape))
        self.means = means.reshape(k, self.dim)
        stds = torch.as_tensor(stds, dtype=torch.float64)
        if stds.ndim == 0:
            stds = stds.expand(k)
        if stds.shape == (k,):
            stds = stds[:, None].expand(k, self.dim)
        elif stds.shape[0] == k and math.prod(stds.shape[1:]) == self.dim:
            stds = stds.reshape(k, self.dim)
        else:
            raise ValueError(f"stds must have shape (K,) or (K, *event_shape); got {tuple(stds.shape)}")
        if not bool((stds > 0).all()):
            raise ValueError("stds must be positive")
        self.vars = stds.contiguous() ** 2
        self.isotropic = bool((self.vars == self.vars[:, :1]).all())
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (k,) or not bool((w >= 0).all()) or float(w.sum()) <= 0:
            raise ValueError(f"weights must be {k} non-negative numbers with a positive sum")
        self.log_weights = torch.log(w / w.sum())
        self.labels = torch.arange(k) if labels is None else torch.as_tensor(labels, dtype=torch.long)
        if self.labels.shape != (k,):
            raise ValueError(f"labels must have shape ({k},)")
        self.num_classes = int(self.labels.max()) + 1

    # ------------------------------------------------------------------------------------------
    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def to(self, device: torch.device | str) -> GaussianMixture:
        """Move the parameters to ``device`` (float64 is kept)."""
        for name in ("means", "vars", "log_weights", "labels"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def mean(self) -> Tensor:
        return (self.log_weights.exp()[:, None] * self.means).sum(0).reshape(self.event_shape)

    def _flat(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.event_shape:
            raise ValueError(
                f"expected inputs of shape (B, {', '.join(map(str, self.event_shape))}), got {tuple(x.shape)}"
            )
        return x.reshape(x.shape[0], self.dim).to(torch.float64)

    def _sigma(self, sigma: Tensor | float, n: int, device: torch.device) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=device)
        if sigma.ndim == 0:
            sigma = sigma.expand(n)
        if sigma.shape != (n,):
            raise ValueError(f"sigma must be a scalar or of shape ({n},), got {tuple(sigma.shape)}")
        if bool((sigma < 0).any()):
            raise ValueError("sigma must be non-negative")
        return sigma

    def _log_prior(self, cond: Tensor | None, n: int) -> Tensor:
        """(B, K) log mixture weights, restricted to class ``cond`` (NULL_LABEL: all components)."""
        lw = self.log_weights.expand(n, -1)
        if cond is None:
            return lw
        cond = torch.as_tensor(cond, device=lw.device).long().reshape(-1)
        if cond.shape != (n,):
            raise ValueError(f"cond must have shape ({n},), got {tuple(cond.shape)}")
        if bool((cond >= self.num_classes).any()) or bool((cond < NULL_LABEL).any()):
            raise ValueError(f"class labels must lie in [0, {self.num_classes}) or be {NULL_LABEL} (null)")
        member = self.labels[None, :] == cond[:, None]
        member |= (cond == NULL_LABEL)[:, None]
        lw = torch.where(member, lw, torch.full_like(lw, -math.inf))
        return lw - torch.logsumexp(lw, dim=1, keepdim=True)

    def _chunks(self, n: int) -> int:
        """Batch chunk size keeping the (chunk, K, D) intermediates of the diagonal path near 2^24 floats."""
        return n if self.isotropic else max(1, (1 << 24) // (self.num_components * self.dim))

    def _stats(self, x: Tensor, sigma: Tensor | float, cond: Tensor | None, what: str) -> Tensor:
        """Chunked evaluation of ``what`` ∈ {log_prob, posterior, denoise, post_var} over the batch."""
        xf = self._flat(x)
        sig = self._sigma(sigma, len(x), x.device)
        log_prior = self._log_prior(cond, len(x))
        step = self._chunks(len(x))
        outs = [
            self._stats_chunk(xf[i : i + step], sig[i : i + step], log_prior[i : i + step], what)
            for i in range(0, len(x), step)
        ]
        return torch.cat(outs) if outs else xf.new_zeros((0,))

    def _stats_chunk(self, x: Tensor, sig: Tensor, log_prior: Tensor, what: str) -> Tensor:
        d = self.dim
        if self.isotropic:
            v = self.vars[:, 0]  # (K,)
            var = v[None] + sig[:, None] ** 2  # (B, K)
            x2 = (x**2).sum(-1, keepdim=True)  # (B, 1)
            xm = x @ self.means.T  # (B, K)
            m2 = (self.means**2).sum(-1)[None]  # (1, K)
            dist2 = (x2 - 2 * xm + m2).clamp_min(0)
            ll = -0.5 * (dist2 / var + d * torch.log(var) + d * math.log(2 * math.pi))
        else:
            var3 = self.vars[None] + sig[:, None, None] ** 2  # (B, K, D)
            diff = x[:, None, :] - self.means[None]
            ll = -0.5 * ((diff**2 / var3).sum(-1) + torch.log(var3).sum(-1) + d * math.log(2 * math.pi))
        joint = ll + log_prior
        if what == "log_prob":
            return torch.logsumexp(joint, dim=1)
        r = torch.softmax(joint, dim=1)  # (B, K) posterior over components
        if what == "posterior":
            return r
        if self.isotropic:
            a = v[None] / var  # Wiener gains (B, K)
            mean = (r * (1 - a)) @ self.means + (r * a).sum(1, keepdim=True) * x
            if what == "denoise":
                return mean
            # E‖m_k‖² with m_k = (1−a_k) μ_k + a_k x, plus the Wiener error variance v_k σ²/(v_k+σ²) per coord
            mk2 = (1 - a) ** 2 * m2 + 2 * a * (1 - a) * xm + a**2 * x2
            second = (r * (mk2 + d * v[None] * sig[:, None] ** 2 / var)).sum(1)
            return second - (mean**2).sum(-1)
        m = self.means[None] + self.vars[None] / var3 * (x[:, None, :] - self.means[None])
        mean = torch.einsum("bk,bkd->bd", r, m)
        if what == "denoise":
            return mean
        post_var = self.vars[None] * sig[:, None, None] ** 2 / var3
        second = (r[..., None] * (post_var + m**2)).sum(1)
        return (second - mean**2).sum(-1)

    def posterior(self, x: Tensor, sigma: Tensor | float, cond: Tensor | None = None) -> Tensor:
        """r_k(x̃) = p(component k | x̃; σ), shape (B, K)."""
        return self._stats(x, sigma, cond, "posterior")

    # ------------------------------------------------------------------------------------------
    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        cond: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """n exact samples (float64) and their class labels; ``cond`` restricts to given classes."""
        probs = self._log_prior(cond, n).exp()
        k = torch.multinomial(probs.cpu(), 1, replacement=True, generator=generator).squeeze(1)
        k = k.to(self.means.device)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64).to(self.means.device)
        x = self.means[k] + self.vars[k].sqrt() * eps
        return x.reshape(n, *self.event_shape), self.labels[k]

    def log_prob(self, x: Tensor, sigma: Tensor | float = 0.0, cond: Tensor | None = None) -> Tensor:
        """Exact log p(x̃; σ) (or log p(x̃ | y; σ) given ``cond``), shape (B,), float64."""
        return self._stats(x, sigma, cond, "log_prob")

    def denoise(self, x: Tensor, sigma: Tensor | float, cond: Tensor | None = None) -> Tensor:
        """The exact denoiser D*(x̃; σ) = E[x0 | x̃], float64, shape of x."""
        return self._stats(x, sigma, cond, "denoise").reshape(x.shape)

    def __call__(self, x: Tensor, sigma: Tensor | float, cond: Tensor | None = None) -> Tensor:
        """Denoiser interface ``D(x, σ, cond)``: returns E[x0 | x̃] in the dtype of x."""
        return self.denoise(x, sigma, cond).to(x.dtype)

    def score(self, x: Tensor, sigma: Tensor | float, cond: Tensor | None = None) -> Tensor:
        """∇_x̃ log p(x̃; σ) = (D* − x̃)/σ² (Karras et al. 2022, eq. 3), float64."""
        sig = self._sigma(sigma, len(x), x.device).reshape(-1, *([1] * (x.ndim - 1)))
        return (self.denoise(x, sigma, cond) - x.to(torch.float64)) / sig**2

    def posterior_variance(self, x: Tensor, sigma: Tensor | float, cond: Tensor | None = None) -> Tensor:
        """tr Cov[x0 | x̃; σ] (B,): the pointwise minimum of the denoising loss E‖D − x0‖² given x̃."""
        return self._stats(x, sigma, cond, "post_var")

    def class_log_prob(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """The exact noisy classifier log p(y | x̃; σ), shape (B, num_classes)."""
        r = self.posterior(x, sigma)
        onehot = torch.nn.functional.one_hot(self.labels, self.num_classes).to(r)
        return torch.log((r @ onehot).clamp_min(1e-300))

    # ------------------------------------------------------------------------------------------
    @classmethod
    def random(
        cls,
        num_components: int,
        event_shape: tuple[int, ...] | int,
        std: float = 0.1,
        spread: float = 1.0,
        num_classes: int | None = None,
        diagonal: bool = False,
        seed: int = 0,
    ) -> GaussianMixture:
        """A random mixture: means ~ N(0, spread²/dim · I)·√dim-normalised, component stds ``std``
        (log-uniform in [std/2, 2·std] per coordinate if ``diagonal``)."""
        shape = (event_shape,) if isinstance(event_shape, int) else tuple(event_shape)
        g = torch.Generator().manual_seed(seed)
        means = torch.randn(num_components, *shape, generator=g, dtype=torch.float64) * spread
        if diagonal:
            u = torch.rand(num_components, *shape, generator=g, dtype=torch.float64)
            stds: Tensor | float = std * torch.exp((2 * u - 1) * math.log(2))
        else:
            stds = std
        weights = 0.5 + torch.rand(num_components, generator=g, dtype=torch.float64)
        labels = None if num_classes is None else torch.arange(num_components) % num_classes
        return cls(means, stds, weights, labels)

    @classmethod
    def grid_2d(cls, n: int = 3, spacing: float = 1.0, std: float = 0.1) -> GaussianMixture:
        """n×n isotropic components on a square grid centred at the origin (a standard 2-D test)."""
        c = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) * spacing
        means = torch.cartesian_prod(c, c)
        return cls(means, std)
