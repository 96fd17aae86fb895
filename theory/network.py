"""The two-layer network f(x) = v^T phi(B x), in numpy float64.

A `TwoLayer` is immutable: its arrays are private read-only copies, so fine-tuning
always builds a new network and can never change the one it started from.
"""
import numpy as np

ACTIVATIONS = ("linear", "relu")


def as_array(value, name, ndim, shape=None):
    """`value` as a fresh float64 array with `ndim` dimensions and finite entries.

    `shape` may fix some sizes (None entries are free). Errors name the argument.
    """
    try:
        array = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a real array, got {type(value).__name__}") from error
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {array.shape}")
    if shape is not None:
        for axis, (got, want) in enumerate(zip(array.shape, shape)):
            if want is not None and got != want:
                raise ValueError(
                    f"{name} has shape {array.shape}; expected size {want} on axis {axis}")
    if array.size == 0:
        raise ValueError(f"{name} is empty (shape {array.shape})")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def check_activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation


def apply_activation(Z, activation):
    """phi(Z) elementwise; phi = identity or ReLU."""
    return Z if activation == "linear" else np.maximum(Z, 0.0)


class TwoLayer:
    """f(x) = v^T phi(B x) with v of shape (k,), B of shape (k, d).

    Args:
        v: head weights, shape (k,).
        B: first-layer weights, shape (k, d); row j is hidden unit j.
        activation: "linear" (phi = identity) or "relu".

    A linear teacher with weights w (d,) is `TwoLayer([1.0], w[None, :])`.
    """

    def __init__(self, v, B, activation="linear"):
        self.activation = check_activation(activation)
        v = as_array(v, "v", 1)
        B = as_array(B, "B", 2, shape=(v.shape[0], None))
        v.flags.writeable = False
        B.flags.writeable = False
        self.v, self.B = v, B

    @property
    def k(self):
        """Number of hidden units."""
        return self.B.shape[0]

    @property
    def d(self):
        """Input dimension."""
        return self.B.shape[1]

    def check_inputs(self, X, name="X"):
        """X as a float64 array of shape (n, d), finite; errors name `name`."""
        return as_array(X, name, 2, shape=(None, self.d))

    def features(self, X):
        """Hidden features phi(X B^T), shape (n, k), for X of shape (n, d)."""
        return apply_activation(self.check_inputs(X) @ self.B.T, self.activation)

    def __call__(self, X):
        """Predictions f(X), shape (n,), for X of shape (n, d)."""
        return self.features(X) @ self.v

    def effective_weights(self):
        """w = B^T v, shape (d,): f(x) = w^T x. Linear networks only."""
        if self.activation != "linear":
            raise ValueError("effective_weights needs activation='linear'; this network is relu")
        return self.B.T @ self.v

    def replace(self, v=None, B=None, activation=None):
        """A new network with some parts replaced (the others are shared, read-only)."""
        return TwoLayer(self.v if v is None else v, self.B if B is None else B,
                        self.activation if activation is None else activation)

    def __repr__(self):
        return f"TwoLayer(k={self.k}, d={self.d}, activation={self.activation!r})"
