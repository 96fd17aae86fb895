"""Two-layer theory of surgical fine-tuning, in numpy float64.

    TwoLayer(v, B, activation)        f(x) = v^T phi(B x); v (k,), B (k, d)
    finetune(net, X, y, tune, ...)    gradient descent, tune in first/last/all/lp-ft
    finetune_path(...)                the same, recording a Trajectory
    gradient_flow(net, X, y, tune)    exact flow (first: linear; last: any phi), t -> inf
    population_loss(net, teacher, cov)   exact E[(net - teacher)^2], x ~ N(0, cov) or mixture
    best_last_layer(_loss)(net, teacher, cov)   optimal head for frozen features
    GaussianMixture(weights, covs)    zero-mean Gaussian mixture, sampling with a Generator
    relu_kernel, cross_moment         the Gaussian second moments behind the losses
    ShiftProblem and its constructors: input_perturbation (P1), label_perturbation (P2),
        new_directions (T1), random_*, p1_instance, p2_instance, t1_instance
    t1_event_probability(ds, m, p, n) exact probability of claim T1's sample condition

`theory.symbolic` holds the sympy derivations (imported on demand: sympy is slow to load).
"""
from .finetune import TUNES, Trajectory, finetune, finetune_path, gradient_flow
from .gaussian import (GaussianMixture, best_last_layer, best_last_layer_loss, check_cov,
                       cross_moment, feature_moments, population_loss, relu_kernel)
from .network import ACTIVATIONS, TwoLayer
from .shifts import (KINDS, ShiftProblem, input_perturbation, label_perturbation,
                     new_directions, p1_instance, p2_instance, random_input_perturbation,
                     random_label_perturbation, random_new_directions, t1_event,
                     t1_event_probability, t1_instance)

__all__ = [
    "ACTIVATIONS", "TUNES", "KINDS", "TwoLayer", "finetune", "finetune_path", "Trajectory",
    "gradient_flow", "population_loss", "best_last_layer", "best_last_layer_loss",
    "feature_moments", "GaussianMixture", "check_cov", "relu_kernel", "cross_moment",
    "ShiftProblem", "input_perturbation", "label_perturbation", "new_directions",
    "random_input_perturbation", "random_label_perturbation", "random_new_directions",
    "p1_instance", "p2_instance", "t1_instance", "t1_event", "t1_event_probability",
]
