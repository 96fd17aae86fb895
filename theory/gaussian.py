"""Exact expectations of two-layer networks under zero-mean Gaussians and their mixtures.

Everything reduces to three second moments of projections a.x, b.x with x ~ N(0, cov):

    E[(a.x)(b.x)]             = a^T cov b
    E[relu(a.x) (b.x)]        = a^T cov b / 2          (symmetry x -> -x)
    E[relu(a.x) relu(b.x)]    = |a||b| / (2 pi) * (sin t + (pi - t) cos t)

where |a|^2 = a^T cov a and t is the angle between a and b in the cov inner product (the
degree-1 arc-cosine kernel, Cho & Saul 2009). A singular cov needs no special case: only
these inner products enter, and a direction with a^T cov a = 0 has a.x = 0 almost surely.
Expectations are linear in the distribution, so a mixture is the weighted sum over its
components.
"""
import numpy as np

from .network import TwoLayer, as_array, check_activation

# Relative tolerances for accepting a covariance as symmetric and PSD: loose enough for
# matrices built in floating point (A A^T, projections), tight enough to catch real errors.
SYMMETRY_RTOL = 1e-10
PSD_RTOL = 1e-10
# Eigenvalues of G below this fraction of the largest count as zero in G^+ (rounding noise).
PINV_RCOND = 1e-12


def check_cov(cov, d=None, name="cov"):
    """Validate a covariance: shape (d, d), finite, symmetric and PSD up to rounding.

    Returns the symmetrized float64 copy (cov + cov^T) / 2. Errors name `name`.
    """
    cov = as_array(cov, name, 2)
    if cov.shape[0] != cov.shape[1]:
        raise ValueError(f"{name} must be square, got shape {cov.shape}")
    if d is not None and cov.shape[0] != d:
        raise ValueError(f"{name} has shape {cov.shape}; the networks need ({d}, {d})")
    scale = np.abs(cov).max()
    if np.abs(cov - cov.T).max() > SYMMETRY_RTOL * scale:
        raise ValueError(f"{name} is not symmetric (max |cov - cov^T| = "
                         f"{np.abs(cov - cov.T).max():.3g})")
    cov = (cov + cov.T) / 2
    eigenvalues = np.linalg.eigvalsh(cov)
    if eigenvalues[0] < -PSD_RTOL * max(np.abs(eigenvalues).max(), np.finfo(float).tiny):
        raise ValueError(f"{name} is not positive semi-definite "
                         f"(smallest eigenvalue {eigenvalues[0]:.3g})")
    return cov


def _square_root(cov):
    """F with F F^T = cov, shape (d, d). Diagonal cov gets an exactly diagonal F, so that
    samples have exact zeros in the directions cov leaves out (the T1 construction relies
    on B_src x being exactly 0 for new-direction samples)."""
    if np.count_nonzero(cov - np.diag(np.diag(cov))) == 0:
        return np.diag(np.sqrt(np.maximum(np.diag(cov), 0.0)))
    eigenvalues, vectors = np.linalg.eigh(cov)
    return vectors * np.sqrt(np.maximum(eigenvalues, 0.0))


class GaussianMixture:
    """A mixture of zero-mean Gaussians: x ~ N(0, covs[j]) with probability weights[j].

    Args:
        weights: shape (m,), nonnegative, summing to 1.
        covs: shape (m, d, d), each symmetric PSD (possibly singular).

    A single Gaussian is `GaussianMixture.gaussian(cov)` (m = 1).
    """

    def __init__(self, weights, covs):
        weights = as_array(weights, "weights", 1)
        if np.any(weights < 0) or abs(weights.sum() - 1.0) > 1e-9:
            raise ValueError(f"weights must be nonnegative and sum to 1, got {weights}")
        covs = as_array(covs, "covs", 3, shape=(weights.shape[0], None, None))
        self.weights = weights / weights.sum()
        self.covs = np.stack([check_cov(c, name=f"covs[{j}]") for j, c in enumerate(covs)])
        self._roots = np.stack([_square_root(c) for c in self.covs])
        for array in (self.weights, self.covs, self._roots):
            array.flags.writeable = False

    @classmethod
    def gaussian(cls, cov):
        """The single Gaussian N(0, cov)."""
        return cls([1.0], np.asarray(cov, dtype=np.float64)[None])

    @property
    def d(self):
        return self.covs.shape[1]

    @property
    def second_moment(self):
        """E[x x^T] = sum_j weights[j] covs[j], shape (d, d)."""
        return np.einsum("j,jab->ab", self.weights, self.covs)

    def sample(self, n, rng):
        """Draw n points. Returns (X, component): X shape (n, d), component shape (n,) int,
        the index of the Gaussian each row came from. Deterministic given `rng`."""
        n = check_count(n, "n")
        check_rng(rng)
        component = rng.choice(len(self.weights), size=n, p=self.weights)
        Z = rng.standard_normal((n, self.d))
        return np.einsum("nab,nb->na", self._roots[component], Z), component

    def __repr__(self):
        return f"GaussianMixture(m={len(self.weights)}, d={self.d})"


def check_count(n, name):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{name} must be a positive integer, got {n!r}")
    return int(n)


def is_real(x):
    """A real scalar (not a bool, a string or None), so a check can name the argument
    instead of leaving float() to fail with "could not convert string to float"."""
    return not isinstance(x, bool) and isinstance(x, (int, float, np.integer, np.floating))


def check_probability(p, name="p"):
    if not is_real(p) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return float(p)


def check_rng(rng):
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy Generator (np.random.default_rng(seed)), "
                         f"got {type(rng).__name__}")


def as_mixture(dist, d=None, name="cov"):
    """A `GaussianMixture` from either a mixture or a covariance matrix (d, d)."""
    if not isinstance(dist, GaussianMixture):
        dist = GaussianMixture.gaussian(check_cov(dist, d, name))
    if d is not None and dist.d != d:
        raise ValueError(f"{name} is a distribution on R^{dist.d}; the networks need R^{d}")
    return dist


def relu_kernel(Ba, Bb, cov):
    """E[relu(Ba x) relu(Bb x)^T] for x ~ N(0, cov): shape (..., ka, kb).

    Ba (..., ka, d), Bb (..., kb, d), cov (..., d, d); leading dimensions broadcast.
    The angle is taken with arctan2 of consistent sine and cosine parts, which keeps the
    kernel accurate to rounding even for (nearly) parallel rows.
    """
    cross = Ba @ cov @ np.swapaxes(Bb, -1, -2)
    norm_a = np.sqrt(np.maximum(np.einsum("...id,...de,...ie->...i", Ba, cov, Ba), 0.0))
    norm_b = np.sqrt(np.maximum(np.einsum("...id,...de,...ie->...i", Bb, cov, Bb), 0.0))
    product = norm_a[..., :, None] * norm_b[..., None, :]
    sine_part = np.sqrt(np.maximum(product**2 - cross**2, 0.0))   # |a||b| sin t
    theta = np.arctan2(sine_part, cross)
    kernel = (sine_part + (np.pi - theta) * cross) / (2 * np.pi)
    return np.where(product > 0, kernel, 0.0)


def cross_moment(Ba, activation_a, Bb, activation_b, cov):
    """E[phi_a(Ba x) phi_b(Bb x)^T] for x ~ N(0, cov): shape (..., ka, kb).

    Ba (..., ka, d), Bb (..., kb, d), cov (..., d, d); activations "linear" or "relu".
    """
    check_activation(activation_a)
    check_activation(activation_b)
    linear = Ba @ cov @ np.swapaxes(Bb, -1, -2)
    if activation_a == activation_b == "linear":
        return linear
    if activation_a == activation_b == "relu":
        return relu_kernel(Ba, Bb, cov)
    return linear / 2


def _gaussian_loss(net, teacher, cov):
    """E[(net(x) - teacher(x))^2] for one Gaussian component."""
    if net.activation == teacher.activation == "linear":
        # Direct form, no cancellation: an exact fit gives a loss at rounding level of
        # (w - w*)^T cov (w - w*), i.e. ~1e-32 rather than ~1e-16.
        diff = net.effective_weights() - teacher.effective_weights()
        return float(diff @ cov @ diff)
    pairs = [(net, net.v), (teacher, -teacher.v)]
    loss = sum(ua @ cross_moment(a.B, a.activation, b.B, b.activation, cov) @ ub
               for a, ua in pairs for b, ub in pairs)
    # The quadratic form is >= 0 exactly; rounding can leave ~-1e-17, which is clipped.
    return max(float(loss), 0.0)


def check_pair(net, teacher):
    for name, value in (("net", net), ("teacher", teacher)):
        if not isinstance(value, TwoLayer):
            raise ValueError(f"{name} must be a TwoLayer, got {type(value).__name__}")
    if net.d != teacher.d:
        raise ValueError(f"net has input dimension {net.d} but teacher has {teacher.d}")


def population_loss(net, teacher, cov):
    """Exact E[(net(x) - teacher(x))^2] for x ~ N(0, cov) (no factor 1/2).

    Args:
        net, teacher: `TwoLayer`s with the same d, linear or relu in any mix.
        cov: covariance (d, d), PSD and possibly singular, or a `GaussianMixture`
            (then the weighted sum over its components).
    Returns: a float >= 0.
    """
    check_pair(net, teacher)
    dist = as_mixture(cov, net.d)
    return float(sum(w * _gaussian_loss(net, teacher, c)
                     for w, c in zip(dist.weights, dist.covs)))


def feature_moments(net, teacher, cov):
    """Moments of the features h = phi(B x) of `net` (its v is ignored) and the labels
    y = teacher(x), x ~ cov (matrix or mixture).

    Returns (G, c, y2): G = E[h h^T] (k, k), c = E[h y] (k,), y2 = E[y^2] (float).
    """
    check_pair(net, teacher)
    dist = as_mixture(cov, net.d)
    G, c, y2 = 0.0, 0.0, 0.0
    for w, S in zip(dist.weights, dist.covs):
        G = G + w * cross_moment(net.B, net.activation, net.B, net.activation, S)
        c = c + w * cross_moment(net.B, net.activation, teacher.B, teacher.activation,
                                 S) @ teacher.v
        y2 = y2 + w * teacher.v @ cross_moment(teacher.B, teacher.activation, teacher.B,
                                               teacher.activation, S) @ teacher.v
    return G, c, float(y2)


def best_last_layer(net, teacher, cov):
    """The head that minimizes the population loss with net's first layer frozen:
    `net` with v = G^+ c (the minimum-norm minimizer). Returns a new `TwoLayer`."""
    G, c, _ = feature_moments(net, teacher, cov)
    return net.replace(v=np.linalg.pinv(G, rcond=PINV_RCOND, hermitian=True) @ c)


def best_last_layer_loss(net, teacher, cov):
    """min_v E[(v^T phi(B x) - teacher(x))^2] = E[y^2] - c^T G^+ c, with B = net.B frozen.

    Clipped at 0: when the features can fit the teacher, rounding leaves ~ -1e-16 E[y^2]."""
    G, c, y2 = feature_moments(net, teacher, cov)
    return max(float(y2 - c @ np.linalg.pinv(G, rcond=PINV_RCOND, hermitian=True) @ c), 0.0)
