"""The batched simulator against theory.finetune (the numpy reference), against itself run
one run at a time, in float32, and on bad input."""
import dataclasses

import numpy as np
import pytest
import torch

import theory
from sims import Batch, gradients, resolve_device, simulate, start_curvature
from sims.simulator import train_losses

REL = 1e-9          # the tolerance for one run against theory.finetune (float64)


def problems(activation, count, rng):
    """Random P1 / P2 / T1 problems on R^6 (k from 2 to 4)."""
    makers = [lambda: theory.random_input_perturbation(rng, 6, int(rng.integers(2, 5)),
                                                       activation),
              lambda: theory.random_label_perturbation(rng, 6, int(rng.integers(2, 5)),
                                                       activation),
              lambda: theory.random_new_directions(rng, 4, 2, int(rng.integers(2, 5)), 0.5,
                                                   activation, init_T_scale=0.1)]
    return [makers[i % 3]() for i in range(count)]


def rel_error(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)


def case(activation, n_values, tunes, seed=0, lr=0.05):
    rng = np.random.default_rng(seed)
    probs = problems(activation, len(n_values), rng)
    samples = [p.sample_target(n, rng) for p, n in zip(probs, n_values)]
    return probs, samples, list(tunes), lr


@pytest.mark.parametrize("activation", ["linear", "relu"])
@pytest.mark.parametrize("exact", [True, False])
def test_one_run_equals_theory_finetune(activation, exact):
    # Every tune mode, with n below and above d = 6 (both coordinate systems).
    tunes = ["first", "last", "all", "lp-ft"] * 2
    n_values = [3, 4, 5, 2, 9, 12, 8, 10]
    probs, samples, tunes, lr = case(activation, n_values, tunes)
    steps = 300
    for p, sample, tune in zip(probs, samples, tunes):
        batch = Batch.from_problems([p], [sample], tune, lr, device="cpu")
        result = simulate(batch, steps, record=50, exact=exact)
        path = theory.finetune_path(p.pretrained, *sample, tune, steps, lr, every=50)
        k = p.pretrained.k
        assert rel_error(result.v[0, :k], path.v[-1]) < REL, tune
        assert rel_error(result.B[0, :k], path.B[-1]) < REL, tune
        # The recorded path: train loss and exact target loss at the same steps.
        at = [list(result.step.numpy()).index(s) for s in path.step]
        assert rel_error(result.train_loss[0, at], path.train_loss) < REL, tune
        target = [p.target_loss(path.net(i)) for i in range(len(path))]
        assert rel_error(result.loss["target"][0, at], target) < REL, tune
        assert rel_error(result.final_loss["target"][0], target[-1]) < REL, tune


def test_a_batch_equals_its_runs_one_at_a_time():
    # Mixed n (zero-row padding), mixed k (zero-unit padding), mixed tunes and step sizes.
    for activation in ("linear", "relu"):
        probs, samples, _, _ = case(activation, [2, 7, 4, 11, 3, 6, 9, 5], [], seed=3)
        tunes = ["first", "last", "all", "lp-ft", "all", "first", "lp-ft", "last"]
        lrs = np.linspace(0.3, 0.5, len(probs)) / start_curvature(
            Batch.from_problems(probs, samples, tunes, 1.0, device="cpu")).numpy()
        batch = Batch.from_problems(probs, samples, tunes, lrs, device="cpu")
        together = simulate(batch, 200, record=[0, 7, 100, 250, 400])
        for i, (p, sample, tune, lr) in enumerate(zip(probs, samples, tunes, lrs)):
            alone = simulate(Batch.from_problems([p], [sample], tune, lr, device="cpu"), 200,
                             record=[0, 7, 100, 250, 400])
            k = p.pretrained.k
            np.testing.assert_allclose(together.v[i, :k], alone.v[0], rtol=1e-11, atol=1e-13)
            np.testing.assert_allclose(together.B[i, :k], alone.B[0], rtol=1e-11, atol=1e-13)
            assert torch.all(together.B[i, k:] == 0) and torch.all(together.v[i, k:] == 0)
            np.testing.assert_allclose(together.loss["target"][i], alone.loss["target"][0],
                                       rtol=1e-10, atol=1e-14)
            # Records past a run's own end are NaN ("all" stops at 200, lp-ft at 400).
            assert bool(torch.isnan(together.train_loss[i, 4])) == (tune != "lp-ft")


def test_exact_and_stepped_paths_agree_over_many_steps():
    probs, samples, _, _ = case("linear", [3, 8, 5, 12], [], seed=4)
    batch = Batch.from_problems(probs, samples, ["first", "last", "lp-ft", "first"], 1.0,
                                device="cpu")
    batch = dataclasses.replace(batch, lr=0.3 / start_curvature(batch))
    exact = simulate(batch, 3000, record=300)
    stepped = simulate(batch, 3000, record=300, exact=False)
    np.testing.assert_allclose(exact.v, stepped.v, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(exact.B, stepped.B, rtol=1e-10, atol=1e-13)
    # Losses decay to ~1e-18 of their start; compare them on the scale of the start.
    np.testing.assert_allclose(exact.train_loss, stepped.train_loss, rtol=1e-8, atol=1e-14)


def test_t1_claim_in_the_simulator():
    # The spec's instance: first-layer tuning reaches ~0, full fine-tuning stays ~3e-4.
    problem = theory.t1_instance()
    sample = problem.sample_target(6, np.random.default_rng(0))
    batch = Batch.from_problems([problem] * 3, [sample] * 3, ["first", "all", "last"], 0.1,
                                device="cpu")
    result = simulate(batch, 20_000)
    first, full, last = result.final_loss["target"].tolist()
    assert first < 1e-25 and 2e-4 < full < 4e-4 and 1.0 < last < 1.1


def test_float32_is_close_to_float64():
    # Measured: weights within 3e-6 (v) and 3e-7 (B) of float64, losses within 7e-7 of
    # E[y^2] (1e-4 relative on the smallest, 0.006: the closed-form losses cancel).
    probs, samples, _, _ = case("relu", [4, 9, 6, 3], [], seed=5)
    tunes = ["first", "last", "all", "lp-ft"]
    batches = [Batch.from_problems(probs, samples, tunes, 0.05, dtype=dtype, device="cpu")
               for dtype in ("float64", "float32")]
    results = [simulate(batch, 500) for batch in batches]
    assert results[1].v.dtype == torch.float32
    energy = batches[0].targets["target"].label_energy()
    np.testing.assert_allclose(results[1].final_loss["target"].double() / energy,
                               results[0].final_loss["target"] / energy, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(results[1].B.double(), results[0].B, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(results[1].v.double(), results[0].v, rtol=1e-5, atol=1e-5)


def test_device_auto_is_cpu_without_cuda():
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    probs, samples, _, _ = case("linear", [3], [])
    assert Batch.from_problems(probs, samples, "all", 0.1).device == resolve_device("auto")


def test_gradients_and_curvature_match_numpy():
    probs, samples, _, _ = case("relu", [5, 8], [], seed=6)
    batch = Batch.from_problems(probs, samples, "all", 0.1, device="cpu")
    grad_v, grad_B = gradients(batch)
    for i, (p, (X, y)) in enumerate(zip(probs, samples)):
        net, n = p.pretrained, len(X)
        Z = X @ net.B.T
        r = np.maximum(Z, 0) @ net.v - y
        np.testing.assert_allclose(grad_v[i, :net.k], np.maximum(Z, 0).T @ r / n, rtol=1e-12)
        np.testing.assert_allclose(grad_B[i, :net.k],
                                   ((r[:, None] * net.v) * (Z > 0)).T @ X / n, rtol=1e-12)
        H = np.maximum(Z, 0)
        expected = max((net.v @ net.v) * np.linalg.eigvalsh(X.T @ X / n)[-1],
                       np.linalg.eigvalsh(H.T @ H / n)[-1])
        assert start_curvature(batch)[i].item() == pytest.approx(expected, rel=1e-12)


def test_divergence_raises_like_theory_or_is_flagged():
    probs, samples, _, _ = case("linear", [5, 5], [], seed=7)
    batch = Batch.from_problems(probs, samples, "all", [0.05, 50.0], device="cpu")
    with pytest.raises(ValueError, match="diverged.*lr"):
        theory.finetune(probs[1].pretrained, *samples[1], "all", 200, 50.0)
    with pytest.raises(ValueError, match=r"runs \[1\] with lr \[50.0\]"):
        simulate(batch, 200, record=20)
    result = simulate(batch, 200, record=20, on_divergence="nan")
    assert result.diverged.tolist() == [False, True]
    assert torch.isnan(result.final_loss["target"][1]) and torch.isnan(result.train_loss[1, -1])
    healthy = simulate(batch.select(torch.tensor([0])), 200, record=20)
    np.testing.assert_array_equal(result.loss["target"][0], healthy.loss["target"][0])


def test_result_update_replaces_runs():
    probs, samples, _, _ = case("linear", [4, 6, 3], [], seed=8)
    batch = Batch.from_problems(probs, samples, "all", 0.05, device="cpu")
    result = simulate(batch, 50, record=10)
    slower = dataclasses.replace(batch, lr=batch.lr / 2)
    index = torch.tensor([1])
    result.update(index, simulate(slower.select(index), 50, record=10))
    np.testing.assert_allclose(result.v[1], simulate(slower, 50, record=10).v[1], rtol=1e-13)
    with pytest.raises(ValueError, match="record points"):
        result.update(index, simulate(slower.select(index), 50, record=5))


def test_train_losses_of_padded_runs_use_their_own_n():
    probs, samples, _, _ = case("relu", [2, 7], [], seed=9)
    batch = Batch.from_problems(probs, samples, "all", 0.1, device="cpu")
    for i, (p, (X, y)) in enumerate(zip(probs, samples)):
        r = p.pretrained(X) - y
        assert train_losses(batch, batch.v, batch.B)[i].item() == pytest.approx(
            r @ r / (2 * len(X)), rel=1e-13)


BAD_BUILDS = {
    "unknown tune": (dict(tune="middle"), "tune must be one of"),
    "zero lr": (dict(lr=0.0), "lr must be positive"),
    "nan lr": (dict(lr=float("nan")), "lr must be positive"),
    "lr count": (dict(lr=[0.1, 0.2, 0.3]), "lr has 3 entries"),
    "nested lr": (dict(lr=[[0.1], [0.2]]), "lr must be one positive number or one per run"),
    "text lr": (dict(lr="0.1"), "lr must be one positive number or one per run"),
    "infinite lr": (dict(lr=[0.1, float("inf")]), r"lr must be positive and finite, got \[inf\]"),
    "sample count": (dict(samples="one"), "samples has 1 entries"),
    "bad dtype": (dict(dtype="float16"), "dtype must be"),
    "bad device": (dict(device="tpu"), "device must be"),
    "nan in X": (dict(samples="nan"), "X contains NaN"),
    "wrong y length": (dict(samples="short y"), "y has shape"),
}


@pytest.mark.parametrize("name", BAD_BUILDS)
def test_bad_batches_are_refused_with_a_clear_error(name):
    rng = np.random.default_rng(0)
    probs = problems("linear", 2, rng)
    samples = [p.sample_target(4, rng) for p in probs]
    kwargs, message = BAD_BUILDS[name]
    kwargs = dict(kwargs)
    if kwargs.get("samples") == "one":
        kwargs["samples"] = samples[:1]
    elif kwargs.get("samples") == "nan":
        X = samples[0][0].copy()
        X[0, 0] = np.nan
        kwargs["samples"] = [(X, samples[0][1]), samples[1]]
    elif kwargs.get("samples") == "short y":
        kwargs["samples"] = [(samples[0][0], samples[0][1][:2]), samples[1]]
    args = dict(problems=probs, samples=samples, tune="all", lr=0.1, device="cpu") | kwargs
    with pytest.raises(ValueError, match=message):
        Batch.from_problems(**args)


def test_learning_rates_as_a_tensor_or_array_are_one_per_run():
    """`start_curvature` returns a tensor: a 1-d tensor of learning rates was refused (with
    all its values in the message) where a list of the same numbers was taken."""
    rng = np.random.default_rng(0)
    probs = problems("linear", 3, rng)
    samples = [p.sample_target(4, rng) for p in probs]
    rates = [0.1, 0.05, 0.02]
    want = Batch.from_problems(probs, samples, "all", rates, device="cpu").lr
    for given in (torch.tensor(rates, dtype=torch.float64), np.array(rates)):
        got = Batch.from_problems(probs, samples, "all", given, device="cpu").lr
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match=r"lr has 2 entries; the batch has 3 runs"):
        Batch.from_problems(probs, samples, "all", torch.tensor(rates[:2]), device="cpu")


def test_bad_simulate_arguments_are_refused():
    rng = np.random.default_rng(0)
    probs = problems("linear", 2, rng)
    batch = Batch.from_problems(probs, [p.sample_target(4, rng) for p in probs], "all", 0.1,
                                device="cpu")
    relu = theory.random_input_perturbation(rng, 6, 2, "relu")
    nets, samples = [p.pretrained for p in probs], [p.sample_target(4, rng) for p in probs]
    for call, message in [
            (lambda: simulate(batch, -1), "steps must be nonnegative"),
            (lambda: simulate(batch, 2.5), "steps must be nonnegative"),
            (lambda: simulate(batch, [10, 10, 10]), "steps has 3 entries"),
            (lambda: simulate(batch, [[10], [10]]), "steps must be nonnegative integers"),
            (lambda: gradients("batch"), "batch must be a sims.Batch"),
            (lambda: simulate(batch, 10, record=0), "record must be a positive"),
            (lambda: simulate(batch, 10, record=[[1]]), "record must be None"),
            (lambda: simulate(batch, 10, on_divergence="ignore"), "on_divergence"),
            (lambda: simulate("batch", 10), "batch must be a sims.Batch"),
            (lambda: Batch.from_problems([probs[0], relu], [p.sample_target(3, rng) for p in
                                                            (probs[0], relu)], "all", 0.1),
             "every net in a batch needs activation"),
            (lambda: Batch.build([], [], "all", 0.1), "nets is empty"),
            # a list, or a name mapped to ShiftProblems: "'list' object has no attribute 'items'",
            # "'ShiftProblem' object is not iterable"
            (lambda: Batch.build(nets, samples, "all", 0.1, targets=[probs[0]]),
             "targets must be a dict"),
            (lambda: Batch.build(nets, samples, "all", 0.1, targets={"t": probs}),
             r"targets\['t'\] must be a list of R \(teacher, cov or GaussianMixture\) pairs"),
            (lambda: Batch.build(nets, samples, "all", 0.1, targets={"t": probs[0]}),
             r"targets\['t'\] must be a list of R")]:
        with pytest.raises(ValueError, match=message):
            call()


def torch_compile_unsupported():
    """Why torch.compile cannot run on the CPU here, or None: torch's own platform check
    (Python versions and builds that dynamo refuses) and inductor's search for a C++
    compiler (it compiles the CPU kernels). Asked before compiling, so that any other
    error of compile=True fails the test instead of skipping it."""
    from torch._dynamo import eval_frame
    from torch._inductor import cpp_builder, exc
    try:
        eval_frame.check_if_dynamo_supported()
    except RuntimeError as error:
        return f"torch.compile is not supported on this platform: {error}"
    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler as error:
        return f"torch.compile needs a C++ compiler for CPU kernels: {error}"
    return None


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")     # from inside torch.compile
def test_compiled_linear_steps_equal_eager():
    # torch.compile fuses STEPS_PER_CALL steps; the numbers must not change beyond rounding.
    reason = torch_compile_unsupported()
    if reason:
        pytest.skip(reason)
    probs, samples, _, _ = case("linear", [3, 5, 4, 12, 9, 10], [], seed=10)
    tunes = ["all", "lp-ft", "first", "all", "lp-ft", "first"]
    batch = Batch.from_problems(probs[:3], samples[:3], tunes[:3], 0.03, device="cpu")
    wide = Batch.from_problems(probs[3:], samples[3:], tunes[3:], 0.01, device="cpu")
    for b in (batch, wide):                   # sample side (n <= d) and input side (n > d)
        eager = simulate(b, 70, record=[0, 33, 70, 140], exact=False)
        fused = simulate(b, 70, record=[0, 33, 70, 140], exact=False, compile=True)
        np.testing.assert_allclose(fused.v, eager.v, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(fused.B, eager.B, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(fused.loss["target"], eager.loss["target"], rtol=1e-10)


def test_zero_dimensional_and_small_integer_arguments_mean_what_they_say():
    """A 0-d array or tensor is one value for every run; steps in uint8 must not wrap when
    lp-ft doubles them (200 + 200 read as 144 before)."""
    rng = np.random.default_rng(0)
    probs = problems("linear", 2, rng)
    samples = [p.sample_target(4, rng) for p in probs]
    plain = Batch.from_problems(probs, samples, "lp-ft", 0.1, device="cpu")
    for lr in (np.array(0.1), torch.tensor(0.1, dtype=torch.float64)):
        batch = Batch.from_problems(probs, samples, "lp-ft", lr, device="cpu")
        assert torch.equal(batch.lr, plain.lr)
    result = simulate(plain, np.uint8(200), record=[0, 400])
    assert result.total_steps.tolist() == [400, 400] and result.step.tolist() == [0, 400]


def test_diverging_runs_are_rerun_at_the_first_halved_rate_that_does_not_diverge():
    """experiments._simulate halves a diverging run's step size until it converges: the
    count of halvings is the smallest j whose lr / 2**j does not diverge (found here by
    running each rate directly), and the run's results are that rate's."""
    from sims.experiments import _simulate
    probs, samples, _, _ = case("linear", [5, 5], [], seed=7)
    batch = Batch.from_problems(probs, samples, "all", [0.05, 50.0], device="cpu")
    result, halved = _simulate(batch, 200, record=20)
    one = batch.select(torch.tensor([1]))
    j = next(j for j in range(20) if not simulate(
        dataclasses.replace(one, lr=one.lr / 2 ** j), 200, record=20,
        on_divergence="nan").diverged.any())
    assert j > 1 and halved.tolist() == [0, j] and not result.diverged.any()
    direct = simulate(dataclasses.replace(one, lr=one.lr / 2 ** j), 200, record=20)
    np.testing.assert_array_equal(result.loss["target"][1], direct.loss["target"][0])


def test_an_int_record_interval_also_records_the_last_step():
    # guards: record=every dropping the last step when `every` does not divide the total
    probs, samples, _, _ = case("linear", [5, 5], [], seed=1)
    batch = Batch.from_problems(probs, samples, ["all", "lp-ft"], 0.05, device="cpu")
    result = simulate(batch, 10, record=3)           # lp-ft takes 10 + 10 steps
    assert result.step.tolist() == [0, 3, 6, 9, 12, 15, 18, 20]
    assert result.total_steps.tolist() == [10, 20]


def test_a_rerun_at_a_halved_rate_also_replaces_the_kept_path():
    # experiments._simulate with keep_path (F5's head drift): the halved run's recorded
    # parameters are those of theory.finetune_path at the rate it ended with, not the
    # NaN of its diverged first try.
    from sims.experiments import _simulate
    probs, samples, _, _ = case("linear", [5, 5], [], seed=7)
    batch = Batch.from_problems(probs, samples, "all", [0.05, 50.0], device="cpu")
    result, halved = _simulate(batch, 200, record=20, keep_path=True)
    assert halved[1] > 0
    for i in range(2):
        lr = batch.lr[i].item() / 2 ** halved[i]
        path = theory.finetune_path(probs[i].pretrained, *samples[i], "all", 200, lr, every=20)
        assert result.step.tolist() == path.step.tolist()
        k = probs[i].pretrained.k                          # the batch pads to the widest
        assert rel_error(result.path_v[i, :, :k], path.v) < REL, i
        assert rel_error(result.path_B[i, :, :k], path.B) < REL, i


def test_relu_gradients_take_relu_prime_of_zero_as_zero():
    # A relu T1 problem blind to T (B_src P_T = 0): new-direction samples reach every unit
    # with pre-activation exactly 0, where relu' = 0 (as in theory and torch), so dL/dB has
    # exactly zero T columns; the old-direction columns match a numpy hand computation.
    problem = theory.random_new_directions(np.random.default_rng(3), 4, 2, 3, 0.5, "relu")
    rng = np.random.default_rng(4)
    while True:
        X, component = problem.target.sample(8, rng)
        if 0 < component.sum() < 8:
            break
    y = problem.target_teacher(X)
    batch = Batch.from_problems([problem], [(X, y)], "all", 0.1, device="cpu")
    _, grad_B = gradients(batch)
    net = problem.pretrained
    Z = X @ net.B.T
    assert np.sum(Z == 0) >= 3 * component.sum()            # the ties are really there
    r = np.maximum(Z, 0) @ net.v - y
    expected = np.zeros((net.k, 6))
    for i in range(8):                                       # a loop over samples, by hand
        for j in range(net.k):
            if Z[i, j] > 0:
                expected[j] += r[i] * net.v[j] * X[i] / 8
    assert np.all(grad_B[0, :, 4:].numpy() == 0)
    np.testing.assert_allclose(grad_B[0].numpy(), expected, rtol=1e-12, atol=1e-15)


def _a_growing_last_layer_run():
    """A "last" run on 3 examples from a near-exact fit at lr 2.2 / curvature: its loss
    grows 1.44-fold a step. Returns the network, data, features, lr and the losses of 400
    steps computed by hand."""
    rng = np.random.default_rng(13)
    net = theory.TwoLayer(rng.standard_normal(3), rng.standard_normal((3, 5)) / np.sqrt(5))
    X = rng.standard_normal((3, 5))
    y = net(X) + 1e-9 * rng.standard_normal(3)
    H = net.features(X)
    lr = 2.2 / np.linalg.eigvalsh(H.T @ H / 3).max()
    v, losses = net.v.copy(), []
    for _ in range(400):                                     # the same steps, by hand
        v = v - lr * H.T @ (H @ v - y) / 3
        losses.append(np.sum((H @ v - y) ** 2) / 6)
    return net, X, y, H, lr, losses


def test_a_padded_runs_divergence_scale_is_its_own_y2_over_2n():
    # guards: |y|^2 / (2n) taken with the batch's largest n. Run 1 (n = 3, padded to 12)
    # starts at a near-exact fit and is stepped at lr 2.2 / curvature, so its loss grows
    # 1.44-fold a step; after s steps it lies between DIVERGENCE_FACTOR |y|^2 / 24 and
    # DIVERGENCE_FACTOR |y|^2 / 6: not a divergence by its own scale (theory agrees).
    from theory.finetune import DIVERGENCE_FACTOR
    net, X, y, H, lr, losses = _a_growing_last_layer_run()
    scale = DIVERGENCE_FACTOR * (y @ y) / 6
    s = next(s for s, loss in enumerate(losses, 1) if scale / 4 < loss < scale)
    tuned = theory.finetune(net, X, y, "last", s, lr)        # no divergence for theory
    other_X = np.random.default_rng(113).standard_normal((12, 5))  # the other run: n = 12
    batch = Batch.build([net, net], [(other_X, other_X @ net.effective_weights()), (X, y)],
                        "last", [0.01, lr], device="cpu")
    result = simulate(batch, s)
    assert not result.diverged.any()
    # The simulator solves "last" in closed form; the ~1e15-fold growth amplifies rounding
    # in either computation to ~1e-6 relative.
    assert rel_error(result.v[1], tuned.v) < 1e-4
    assert result.final_train_loss[1].item() == pytest.approx(losses[s - 1], rel=1e-4)


def test_a_finite_loss_past_the_divergence_factor_is_a_divergence():
    # guards: only non-finite losses counted as divergence. The "last" run below grows its
    # loss 1.44-fold a step (lr 2.2 / curvature, checked by a hand loop) and is stopped at
    # the first step past 10 DIVERGENCE_FACTOR times its scale, where the loss is still
    # finite (< 1e30): theory raises there, and so must the simulator, stepped or exact.
    from theory.finetune import DIVERGENCE_FACTOR
    net, X, y, H, lr, losses = _a_growing_last_layer_run()
    scale = DIVERGENCE_FACTOR * max(np.sum((H @ net.v - y) ** 2) / 6, y @ y / 6)
    s = next(s for s, loss in enumerate(losses, 1) if loss > 10 * scale)
    assert losses[s - 1] < 1e30
    with pytest.raises(ValueError, match="diverged"):
        theory.finetune(net, X, y, "last", s, lr)
    batch = Batch.build([net], [(X, y)], "last", lr, device="cpu")
    for exact in (True, False):
        with pytest.raises(ValueError, match="diverged"):
            simulate(batch, s, exact=exact)
        result = simulate(batch, s, exact=exact, on_divergence="nan")
        assert result.diverged.tolist() == [True], exact
        assert torch.isnan(result.final_train_loss[0]), exact


def test_first_layer_tuning_of_a_zero_head_leaves_B_in_place():
    # With v = 0 the first layer's gradient v r^T X / n is 0: B never moves (theory's
    # gradient_flow says so; finetune steps it). The closed form must not divide by |v|^2.
    rng = np.random.default_rng(14)
    net = theory.TwoLayer(np.zeros(3), rng.standard_normal((3, 5)))
    X = rng.standard_normal((4, 5))
    y = X @ rng.standard_normal(5)
    batch = Batch.build([net, net], [(X, y), (X, y)], "first", 0.1, device="cpu")
    for exact in (True, False):
        result = simulate(batch, 50, record=10, exact=exact)
        assert not result.diverged.any() and torch.equal(result.B[0], batch.B[0]), exact
        np.testing.assert_allclose(result.train_loss[0], np.full(6, y @ y / 8), rtol=1e-14)
    assert np.array_equal(theory.finetune(net, X, y, "first", 50, 0.1).B, net.B)


def test_select_keeps_each_chosen_runs_own_tune_in_the_order_asked():
    # guards: a selection taking the first len(index) tunes: a halved rerun of runs
    # [2, 0] of a mixed batch would tune "first" and "last" instead of "all" and "first".
    rng = np.random.default_rng(5)
    net = theory.TwoLayer(rng.standard_normal(2), rng.standard_normal((2, 3)))
    X = rng.standard_normal((4, 3))
    batch = Batch.build([net] * 3, [(X, X[:, 0])] * 3, ["first", "last", "all"],
                        [0.1, 0.2, 0.3], device="cpu")
    chosen = batch.select(torch.tensor([2, 0]))
    assert chosen.tune == ("all", "first")
    assert chosen.lr.tolist() == [0.3, 0.1]


def test_a_run_once_past_the_divergence_factor_stays_diverged_though_its_loss_comes_back():
    # guards: the divergence flag overwritten at each record (`diverged = bad`, not `|=`),
    # which would let a run whose loss spiked past DIVERGENCE_FACTOR x its scale and then
    # came back be recorded again and end with finite final losses. Hand-made states:
    # v = 1e6 v0 (train loss ~1e12 x the start) at record 0, v0 again at record 1.
    from sims.simulator import _Recorder
    rng = np.random.default_rng(6)
    net = theory.TwoLayer(rng.standard_normal(2), rng.standard_normal((2, 3)))
    X = rng.standard_normal((4, 3))
    batch = Batch.build([net], [(X, X[:, 0])], "all", 0.1,
                        {"t": [(net, np.eye(3))]}, device="cpu")
    recorder = _Recorder(batch, np.array([0, 1]), np.array([1]), False, False)
    runs = np.array([0])
    recorder.write(runs, np.array([0]), 1e6 * batch.v, batch.B)
    recorder.write(runs, np.array([1]), batch.v, batch.B)
    result = recorder.result(batch.v, batch.B)
    assert result.diverged.tolist() == [True]
    assert torch.isnan(result.train_loss).all() and torch.isnan(result.loss["t"]).all()
    assert torch.isnan(result.final_train_loss[0]) and torch.isnan(result.final_loss["t"][0])
