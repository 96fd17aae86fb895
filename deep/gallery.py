"""A picture of the Fashion-MNIST shift suite: a few target images per benchmark.

    python -m deep.gallery --out figures/fmnist_targets.png [--data-dir DIR]

Five panels, top to bottom: fmnist-c (the same test images, clean and under each
corruption at severity 5), fmnist-breeds (source vs target subclasses of each
superclass), fmnist-flip (images with their flipped labels), fmnist-spurious
(source images, mostly in the majority groups, vs the group-balanced target) and
fmnist-blocknoise (clean target images: its shift lives in the network). The
images come from the benchmark code itself, so the picture shows what is tuned on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from deep.data import fmnist as F
from deep.errors import ConfigError, exit_status
from deep.files import check_output
from deep.flags import comma_list

SHOW_CLASSES = (0, 3, 7, 8)       # T-shirt/top, Dress, Sneaker, Bag: one row each in the fmnist-c panel
PER_SIDE = 4                      # breeds: images per superclass and side
STRIP = 8                         # spurious: images per row = 2 * STRIP


def _pixels(images: torch.Tensor) -> np.ndarray:
    """Normalised (n, 1, 28, 28) -> float (n, 28, 28) in [0, 1]."""
    return (images[:, 0] * F.STD[0] + F.MEAN[0]).clamp(0, 1).numpy()


def _show(ax, image: np.ndarray, title: str = "", color: str = "black") -> None:
    ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7, color=color, pad=2)


CELL, TITLE, HEADER = 0.8, 0.34, 0.42   # inches: image side, space for a 2-line title, panel heading
MARGIN = 0.5                             # inches left of the images (row labels)


def _grid(fig, rows: int, cols: int, width_cells: int, titled_rows: bool = True):
    """rows x cols axes of CELL-inch images, left-aligned in a panel `width_cells` images wide.

    `titled_rows`: every row has titles (else only the first, and rows sit closer)."""
    fig_w = fig.get_figure(root=True).get_size_inches()[0]
    panel_h = panel_height(rows, titled_rows)
    usable = fig_w - MARGIN - 0.2
    right = (MARGIN + usable * cols / width_cells) / fig_w
    gap = TITLE if titled_rows else 0.08
    return fig.subplots(rows, cols, squeeze=False, gridspec_kw=dict(
        left=MARGIN / fig_w, right=right, top=1 - (HEADER + TITLE) / panel_h, bottom=0.1 / panel_h,
        hspace=gap / CELL, wspace=0.12))


def panel_height(rows: int, titled_rows: bool = True) -> float:
    gaps = (rows - 1) * (TITLE if titled_rows else 0.08)
    return HEADER + TITLE + rows * CELL + gaps + 0.1


def _heading(fig, text: str) -> None:
    fig.suptitle(text, fontsize=10, x=0.005, y=0.995, ha="left", va="top", fontweight="bold")


def _first_of_class(labels: np.ndarray, classes, count: int = 1) -> list[int]:
    return [int(i) for c in classes for i in np.flatnonzero(labels == c)[:count]]


def panel_c(fig, data_dir, corruptions, width: int) -> None:
    data = F.load_fashion_mnist(data_dir)
    index = _first_of_class(data.test_labels, SHOW_CLASSES)
    columns = [("clean", data.test_images)] + [
        (name, F.corrupted_test_images(data_dir, name)) for name in corruptions]
    axes = _grid(fig, len(index), len(columns), width, titled_rows=False)
    for j, (name, images) in enumerate(columns):
        for i, k in enumerate(index):
            _show(axes[i, j], images[k] / 255.0, name.replace("_", "\n") if i == 0 else "")
    _heading(fig, "fmnist-c: the same test images, clean and with each corruption (severity 5)")


def panel_breeds(fig, data_dir, width: int) -> None:
    data = F.load_fashion_mnist(data_dir)
    axes = _grid(fig, len(F.SUPERCLASSES), 2 * PER_SIDE + 1, width)
    for row, (superclass, (source, target)) in enumerate(F.SUPERCLASSES.items()):
        axes[row, PER_SIDE].axis("off")   # a gap between the source and the target side
        for side, (images, labels, subclasses) in enumerate(((data.train_images, data.train_labels, source),
                                                             (data.test_images, data.test_labels, target))):
            per = int(np.ceil(PER_SIDE / len(subclasses)))
            picks = _first_of_class(labels, subclasses, per)[:PER_SIDE]
            for j, k in enumerate(picks):
                _show(axes[row, side * (PER_SIDE + 1) + j], images[k] / 255.0,
                      ("source" if side == 0 else "target") + f"\n{F.CLASS_NAMES[labels[k]]}",
                      "tab:blue" if side == 0 else "tab:red")
        axes[row, 0].set_ylabel(superclass, fontsize=8)
    _heading(fig, "fmnist-breeds: 3 superclasses (rows); the source model saw the subclasses on the "
                  "left, the target has only the unseen ones on the right")


def panel_flip(fig, data_dir, width: int) -> None:
    task = F.load_fmnist_flip(data_dir, "flip", n_target=100, val_per_class=1, test_per_class=1, seed=0)
    images, labels = _pixels(task.train.images), task.train.labels.numpy()
    picks = _first_of_class(labels, range(10))
    axes = _grid(fig, 1, len(picks), width)[0]
    for ax, k in zip(axes, picks):
        _show(ax, images[k], f"{F.CLASS_NAMES[9 - labels[k]]}\nlabel {9 - labels[k]} -> {labels[k]}")
    _heading(fig, "fmnist-flip: clean test images, every label y -> 9 - y")


def panel_spurious(fig, data_dir, width: int) -> None:
    source = F.source_fmnist_spurious(data_dir).train.subset(torch.arange(400))
    target = F.load_fmnist_spurious(data_dir, "balanced", n_target=100, val_per_class=1,
                                    test_per_class=1, seed=0).train
    axes = _grid(fig, 2, 2 * STRIP, width)
    for row, (split, name) in enumerate(((source, "source"), (target, "target"))):
        images, labels, groups = _pixels(split.images), split.labels.numpy(), split.groups.numpy()
        # Four images per group where the split has them, majority groups first.
        picks = [int(i) for g in (3, 0, 1, 2) for i in np.flatnonzero(groups == g)[:4]][:2 * STRIP]
        for ax, k in zip(axes[row], picks):
            majority = groups[k] in (0, 3)
            _show(ax, images[k], f"{F.CLASS_NAMES[labels[k]]}\n{F.GROUP_NAMES[groups[k]]}",
                  "black" if majority else "tab:red")
        axes[row, 0].set_ylabel(name, fontsize=8)
    _heading(fig, "fmnist-spurious: in the source the mark is at the top for the A classes "
                  "(T-shirt/top, Dress, Coat, Sneaker, Bag) in 95 % of images; the target is "
                  "group-balanced (minority groups in red)")


def panel_blocknoise(fig, data_dir, width: int) -> None:
    task = F.load_fmnist_blocknoise(data_dir, "first", n_target=100, val_per_class=1,
                                    test_per_class=1, seed=0)
    images, labels = _pixels(task.train.images), task.train.labels.numpy()
    picks = _first_of_class(labels, range(10))
    axes = _grid(fig, 1, len(picks), width)[0]
    for ax, k in zip(axes, picks):
        _show(ax, images[k], F.CLASS_NAMES[labels[k]])
    scales = ", ".join(f"{b} {s:g}" for b, s in F.NOISE_SCALES.items())
    _heading(fig, f"fmnist-blocknoise: clean target images; the shift is fixed noise on one block's "
                  f"weights (noise norm / weight norm: {scales})")


def check_png(out: str | Path, what: str = "out") -> Path:
    """`out` if a PNG file can be written there (a .png name, not a folder, its folder
    writable); else a ConfigError before anything is drawn."""
    path = Path(out).expanduser()
    if path.is_dir():
        raise ConfigError(f"{what} {out} is a folder; give the PNG file to write, e.g. "
                          f"{path / 'fmnist_targets.png'}")
    if path.suffix.lower() != ".png":
        raise ConfigError(f"{what} {out}: the gallery is a PNG image, so give a file name "
                          f"ending in .png (e.g. figures/fmnist_targets.png)")
    return check_output(path, what)


def check_corruptions(corruptions) -> list[str]:
    """The fmnist-c corruptions to show (None: all); an unknown name is a ConfigError."""
    corruptions = list(F.CORRUPTION_NAMES if corruptions is None else corruptions)
    unknown = sorted(set(corruptions) - set(F.CORRUPTION_NAMES), key=str)
    if unknown:
        raise ConfigError(f"unknown corruption(s) {unknown}; known: "
                          f"{', '.join(F.CORRUPTION_NAMES)}")
    return corruptions


def make_gallery(out: str | Path, data_dir=None, corruptions=None, what: str = "out") -> Path:
    """Draw the five panels into one PNG at `out`; returns its path. Every bad value fails
    first, before anything is drawn or a folder made (`what` names `out` in the error)."""
    corruptions = check_corruptions(corruptions)
    F.load_fashion_mnist(data_dir)   # a missing or broken data folder fails before out is made
    out = check_png(out, what)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(len(corruptions) + 1, 2 * STRIP, 10)   # images across the widest panel
    heights = [panel_height(len(SHOW_CLASSES), titled_rows=False), panel_height(len(F.SUPERCLASSES)),
               panel_height(1), panel_height(2), panel_height(1)]
    # matplotlib's own defaults, whatever the process set before (seaborn's theme from
    # sims.plots.style(), a notebook's rcParams): the same picture in any process
    with plt.style.context("default"):
        fig = plt.figure(figsize=(MARGIN + 0.2 + width * CELL * 1.12, sum(heights)))
        panels = fig.subfigures(len(heights), 1, height_ratios=heights)
        panel_c(panels[0], data_dir, corruptions, width)
        panel_breeds(panels[1], data_dir, width)
        panel_flip(panels[2], data_dir, width)
        panel_spurious(panels[3], data_dir, width)
        panel_blocknoise(panels[4], data_dir, width)
        tmp = out.with_name(out.name + ".tmp.png")
        # every text drawn, in the PNG's Description: a test compares it with a fresh
        # drawing's (pixels differ between matplotlib versions; what the captions say must not)
        fig.savefig(tmp, dpi=100, metadata={"Description": drawn_text(fig)})
        plt.close(fig)
    tmp.replace(out)   # atomic: a crash never leaves half a PNG
    return out


def drawn_text(fig) -> str:
    """Every non-empty text of `fig` (headings, image titles), one per line, in drawing order."""
    import matplotlib.text
    return "\n".join(t.get_text() for t in fig.findobj(matplotlib.text.Text) if t.get_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deep.gallery", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="figures/fmnist_targets.png", help="PNG to write")
    parser.add_argument("--data-dir", default=None,
                        help=f"folder with the Fashion-MNIST IDX files (default ${F.ENV_VAR}, "
                             f"then {F.DEFAULT_DIR})")
    parser.add_argument("--corruptions", type=comma_list(), default=None,
                        help="comma-separated subset of the fmnist-c corruptions (default: all 15)")
    args = parser.parse_args(argv)
    return exit_status(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    if args.corruptions == []:
        raise ConfigError(f"--corruptions names no corruption; give a comma-separated subset "
                          f"of {', '.join(F.CORRUPTION_NAMES)}, or leave it out for all of them")
    print(make_gallery(args.out, args.data_dir, args.corruptions, what="--out"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
