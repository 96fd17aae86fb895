"""How much each fmnist-blocknoise perturbation costs the committed source model.

    python -m deep.calibrate [--scales 0.1,0.25,0.5,1,2] [--images 2000]

Prints, for every block and noise scale (noise norm / weight norm), the clean test
accuracy of the source model after the perturbation, averaged over two noise seeds.
`deep.data.fmnist.NOISE_SCALES` holds the per-block defaults chosen from this table.
"""

from __future__ import annotations

import argparse

import torch

from .checkpoints import load_model
from .data import get_benchmark
from .data.fmnist import BLOCKNOISE_SHIFTS, NOISE_SCALES, block_perturbation
from .errors import ConfigError, check_int, check_positive, exit_status
from .flags import at_least, positive_floats
from .train import evaluate


def blocknoise_accuracy(scales: list[float], images: int = 2000, seeds=(0, 1),
                        arch: str = "resnet26") -> dict[tuple[str, float], float]:
    """(block, scale) -> clean test accuracy after the perturbation, mean over `seeds`;
    (\"none\", 0.0) -> accuracy of the unperturbed model. Uses the last `images` test images.

    Raises ConfigError, before the model is loaded, for a scale that is not a positive
    number, no seeds, or `images` not in 1..the number of test images."""
    scales = [check_positive("noise scale (--scales)", s) for s in scales]
    images = check_int("images (--images)", images)
    if not seeds:
        raise ConfigError("seeds must name at least one noise seed, got none")
    bench = get_benchmark("fmnist-blocknoise")
    test = bench.load_source(None).test
    if images > len(test):
        # arange(len - images, len) would start below 0 and count images twice
        raise ConfigError(f"images (--images) must be at most {len(test)}, the number of "
                          f"test images in the fmnist-blocknoise source split; got {images}")
    test = test.subset(torch.arange(len(test) - images, len(test)))
    checkpoint = bench.pretrained(arch, None)
    base = load_model(checkpoint, arch, bench.num_classes, bench.in_channels)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    out = {("none", 0.0): evaluate(base, test).acc}
    for block in BLOCKNOISE_SHIFTS:
        for scale in scales:
            accs = []
            for seed in seeds:
                base.load_state_dict(state)
                block_perturbation(block, arch, scale, seed)(base)
                accs.append(evaluate(base, test).acc)
            out[(block, scale)] = sum(accs) / len(accs)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m deep.calibrate", description=__doc__.split("\n")[0])
    p.add_argument("--scales", type=positive_floats, default=[0.1, 0.25, 0.5, 1.0, 2.0],
                   help="noise norm / weight norm, comma-separated positive numbers "
                        "(default 0.1,0.25,0.5,1,2)")
    p.add_argument("--images", type=at_least(1), default=2000,
                   help="score on the last N test images, at most the 10,000 of the split "
                        "(default 2000)")
    args = p.parse_args(argv)
    return exit_status(lambda: run(args.scales, args.images))


def run(scales: list[float], images: int) -> int:
    table = blocknoise_accuracy(scales, images)
    print(f"unperturbed: {100 * table[('none', 0.0)]:.1f} %")
    print("| block | " + " | ".join(f"{s:g}" for s in scales) + " | default |")
    print("|---|" + "---|" * (len(scales) + 1))
    for block in BLOCKNOISE_SHIFTS:
        cells = " | ".join(f"{100 * table[(block, s)]:.1f}" for s in scales)
        print(f"| {block} | {cells} | {NOISE_SCALES[block]:g} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
