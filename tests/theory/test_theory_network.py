"""TwoLayer: forward pass against hand computation, validation, immutability."""
import numpy as np
import pytest

from theory import TwoLayer


def test_forward_matches_hand_computation():
    v, B = np.array([2.0, -1.0]), np.array([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
    X = np.array([[1.0, 1.0, 1.0], [-1.0, 0.0, 3.0]])
    # hidden pre-activations: row 0 -> (0, 2.5), row 1 -> (-4, -0.5)
    assert np.allclose(TwoLayer(v, B)(X), [2 * 0 - 2.5, 2 * -4 + 0.5])
    assert np.allclose(TwoLayer(v, B, "relu")(X), [-2.5, 0.0])
    assert TwoLayer(v, B)(X).shape == (2,)
    assert np.allclose(TwoLayer(v, B).effective_weights(), B.T @ v)


def test_linear_teacher_convention():
    w = np.array([0.3, -2.0])
    X = np.random.default_rng(0).standard_normal((5, 2))
    assert np.allclose(TwoLayer([1.0], w[None, :])(X), X @ w)


def test_network_is_immutable_and_copies_inputs():
    v, B = np.ones(2), np.ones((2, 3))
    net = TwoLayer(v, B)
    v[0], B[0, 0] = 5.0, 5.0
    assert net.v[0] == 1.0 and net.B[0, 0] == 1.0
    with pytest.raises(ValueError):
        net.v[0] = 2.0


@pytest.mark.parametrize("v, B, activation, name", [
    (np.ones((2, 1)), np.ones((2, 3)), "linear", "v"),
    (np.ones(2), np.ones((3, 3)), "linear", "B"),
    (np.ones(2), np.ones(3), "linear", "B"),
    (np.array([1.0, np.nan]), np.ones((2, 3)), "linear", "v"),
    (np.ones(2), np.full((2, 3), np.inf), "linear", "B"),
    (np.ones(2), np.ones((2, 3)), "tanh", "activation"),
    (np.ones(0), np.ones((0, 3)), "linear", "v"),
    ("abc", np.ones((2, 3)), "linear", "v"),
])
def test_bad_construction_names_the_argument(v, B, activation, name):
    with pytest.raises(ValueError, match=name):
        TwoLayer(v, B, activation)


@pytest.mark.parametrize("X", [np.ones((4, 2)), np.ones(3), np.array([[1.0, np.nan, 0.0]])])
def test_bad_inputs_name_X(X):
    with pytest.raises(ValueError, match="X"):
        TwoLayer(np.ones(2), np.ones((2, 3)))(X)


def test_effective_weights_rejects_relu():
    with pytest.raises(ValueError, match="linear"):
        TwoLayer(np.ones(2), np.ones((2, 3)), "relu").effective_weights()


@pytest.mark.parametrize("v, B, name", [("abc", np.ones((2, 3)), "v"), (np.ones(2), "abc", "B"),
                                        ([1.0, "x"], np.ones((2, 3)), "v")])
def test_non_numeric_weights_are_refused_by_a_message_that_names_the_argument(v, B, name):
    # "could not convert string to float" matches a bare "v" too (con-v-ert): the check
    # must be the module's own message, which starts with the argument's name.
    with pytest.raises(ValueError, match=f"^{name} must be a real array"):
        TwoLayer(v, B)
