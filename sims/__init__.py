"""Batched simulations of the two-layer theory in torch, and the theory figures.

    Batch.build(nets, samples, tune, lr, targets)    R runs stacked as tensors
    Batch.from_problems(problems, samples, tune, lr) runs on theory.ShiftProblems
    simulate(batch, steps, record=...)               all runs at once -> Result
    gradients(batch), start_curvature(batch)         at the pretrained point
    Target                                           exact Gaussian losses, batched
    resolve_device("auto"), resolve_dtype("float64")

`python -m sims figures` makes F1..F6 (`sims.experiments`, `sims.plots`, `sims.figures`);
`python -m sims.speed` is the speed benchmark.
"""
from .moments import Target
from .simulator import (Batch, Result, gradients, resolve_device, resolve_dtype, simulate,
                        start_curvature, train_losses)

__all__ = ["Batch", "Result", "Target", "gradients", "resolve_device", "resolve_dtype",
           "simulate", "start_curvature", "train_losses"]
