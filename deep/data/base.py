"""What every benchmark loader returns: labelled splits and a shift task.

A loader never hands the training loop raw files or arrays. It returns a
`ShiftTask` whose `train`, `val` and `test` are `Split`s; the loop only calls
`Split.batches`. Two kinds of split cover every benchmark:

- `TensorSplit`: images already decoded and normalised in memory (Fashion-MNIST,
  CIFAR-10(-C), the synthetic benchmark);
- `FileSplit`: image files decoded lazily, batch by batch (ImageNet-C, BREEDS,
  Waterbirds, CelebA), so a 224-px benchmark never has to fit in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from ..errors import ConfigError, DeepError, check_int, check_seed


class DataError(DeepError):
    """Data is missing or malformed. The message names the file and the layout expected."""


Normalization = tuple[Sequence[float], Sequence[float]]
"""(mean, std) per channel, in the order the images' channels come."""


def mean_std(normalization: Normalization | None, default: Normalization,
             channels: int = 3) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel: `normalization` checked, or the loader's `default` (None).

    Loaders take a `normalization` option so that a model's own input normalisation
    (`deep.normalization`) reaches them."""
    if normalization is None:
        normalization = default
    try:
        mean, std = (tuple(float(v) for v in part) for part in normalization)
    except (TypeError, ValueError):
        raise ConfigError(f"normalization must be (mean, std), each {channels} numbers, got "
                          f"{normalization!r}") from None
    if len(mean) != channels or len(std) != channels or not all(v > 0 for v in std):
        raise ConfigError(f"normalization must be (mean, std) with {channels} numbers each "
                          f"and std > 0, got mean={mean}, std={std}")
    return mean, std


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
"""(images float32 (b, C, H, W), labels int64 (b,), groups int64 (b,) or None)."""


class Split:
    """A labelled set of images.

    Attributes:
        labels: int64 tensor (n,), class indices in [0, num_classes).
        groups: int64 tensor (n,), group indices in [0, num_groups), or None when the
            benchmark has no groups (worst-group accuracy is then not reported). -1
            marks an example in no group: counted in the average accuracy only (FMoW's
            region "Other").
    """

    labels: torch.Tensor
    groups: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, shuffle: bool = False,
                generator: torch.Generator | None = None) -> Iterator[Batch]:
        raise NotImplementedError

    def subset(self, indices: Sequence[int] | torch.Tensor) -> "Split":
        raise NotImplementedError

    def order(self, shuffle: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """The example indices `batches` visits: a permutation drawn from `generator`
        when shuffling, else 0..n-1. The engine draws the same order to index cached
        activations, so both must consume the generator identically."""
        if shuffle:
            return torch.randperm(len(self), generator=generator)
        return torch.arange(len(self))



def _as_index(indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(indices, dtype=torch.long)


def _check_labels(labels: torch.Tensor, groups: torch.Tensor | None, n: int, where: str) -> None:
    if labels.dtype != torch.int64 or labels.ndim != 1 or len(labels) != n:
        raise DataError(f"{where}: labels must be int64 of shape ({n},), "
                        f"got {labels.dtype} {tuple(labels.shape)}")
    if groups is not None and (groups.dtype != torch.int64 or groups.shape != labels.shape):
        raise DataError(f"{where}: groups must be int64 of shape ({n},), "
                        f"got {groups.dtype} {tuple(groups.shape)}")


class TensorSplit(Split):
    """Images held in memory.

    Args:
        images: float32 tensor (n, C, H, W), already normalised.
        labels: int64 tensor (n,).
        groups: optional int64 tensor (n,).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor,
                 groups: torch.Tensor | None = None, name: str = "split"):
        if images.ndim != 4 or images.dtype != torch.float32:
            raise DataError(f"{name}: images must be float32 of shape (n, C, H, W), "
                            f"got {images.dtype} {tuple(images.shape)}")
        _check_labels(labels, groups, len(images), name)
        self.images, self.labels, self.groups, self.name = images, labels, groups, name

    def batches(self, batch_size, shuffle=False, generator=None):
        order = self.order(shuffle, generator)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            g = self.groups[idx] if self.groups is not None else None
            yield self.images[idx], self.labels[idx], g

    def subset(self, indices):
        idx = _as_index(indices)
        g = self.groups[idx] if self.groups is not None else None
        return TensorSplit(self.images[idx], self.labels[idx], g, self.name)


class _FileDataset(torch.utils.data.Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image, UnidentifiedImageError
        path = self.paths[i]
        try:
            with Image.open(path) as im:
                im.load()
                return self.transform(im.convert("RGB"))
        except FileNotFoundError:
            raise DataError(f"image file missing: {path}") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise DataError(f"cannot decode image {path}: {err}") from None
        except DataError as err:          # the transform's (an image too small): which file
            raise DataError(f"{path}: {err}") from None


class FileSplit(Split):
    """Image files decoded lazily, batch by batch.

    Args:
        paths: one image file per example.
        labels, groups: as for `TensorSplit`.
        transform: PIL image -> float32 tensor (C, H, W), normalised. Must be
            deterministic (no augmentation), so cached activations stay valid.
        num_workers: decoding processes for the DataLoader.
    """

    def __init__(self, paths: Sequence[str], labels: torch.Tensor,
                 groups: torch.Tensor | None, transform: Callable, num_workers: int = 0,
                 name: str = "split"):
        _check_labels(labels, groups, len(paths), name)
        check_int("num_workers", num_workers, minimum=0)
        self.paths, self.labels, self.groups = list(map(str, paths)), labels, groups
        self.transform, self.num_workers, self.name = transform, num_workers, name

    def batches(self, batch_size, shuffle=False, generator=None):
        order = self.order(shuffle, generator)
        dataset = torch.utils.data.Subset(_FileDataset(self.paths, self.transform), order.tolist())
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size,
                                             num_workers=self.num_workers)
        try:
            for start, x in zip(range(0, len(order), batch_size), loader):
                idx = order[start:start + batch_size]
                g = self.groups[idx] if self.groups is not None else None
                yield x, self.labels[idx], g
        except DataError as err:
            if not self.num_workers:
                raise
            # A worker's error arrives as "Caught DataError in DataLoader worker process 0.
            # Original Traceback ...": keep the one line that says which file and why.
            raise DataError(str(err).rstrip().rsplit("DataError: ", 1)[-1]) from None

    def subset(self, indices):
        idx = _as_index(indices)
        g = self.groups[idx] if self.groups is not None else None
        return FileSplit([self.paths[i] for i in idx.tolist()], self.labels[idx], g,
                         self.transform, self.num_workers, self.name)


def file_split(root: Path, files: Sequence[str], labels: torch.Tensor,
               groups: torch.Tensor | None, idx: torch.Tensor, transform: Callable,
               num_workers: int, name: str, listed_in: str, layout: str) -> FileSplit:
    """The `FileSplit` of examples `idx` of a benchmark whose metadata lists one image
    file per example (`files`, relative to `root`) with its label and group.

    Every file is checked first: a missing one is a DataError naming the split, the
    metadata file that lists it (`listed_in`) and the expected `layout`.
    """
    paths = [root / files[i] for i in idx.tolist()]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{name}: {len(missing)} image file(s) listed in {listed_in} are "
                        f"missing, e.g. {missing[0]}; expected:\n{layout}")
    return FileSplit(paths, labels[idx], groups[idx] if groups is not None else None,
                     transform, num_workers=num_workers, name=name)


@dataclass
class ShiftTask:
    """One target distribution to adapt to, with its three splits.

    Attributes:
        benchmark: registry name, e.g. "cifar10c".
        shift: which shift of the benchmark, e.g. "gaussian_noise".
        num_classes: number of classes the model predicts.
        train: the small labelled target set that is tuned on.
        val: selects the (learning rate, epoch).
        test: reported.
        group_names: names of the groups when the splits carry groups; worst-group
            accuracy is reported then.
        perturb: applied in place to the pretrained model before tuning, for shifts
            that live in the network rather than the data (fmnist-blocknoise).
    """

    benchmark: str
    shift: str
    num_classes: int
    train: Split
    val: Split
    test: Split
    group_names: tuple[str, ...] | None = None
    perturb: Callable[[torch.nn.Module], None] | None = None

    def __post_init__(self):
        for name in ("train", "val", "test"):
            split = getattr(self, name)
            if len(split) == 0:
                hint = ("n_target (--n-target)" if name == "train"
                        else f"{name}_per_class (--{name}-per-class)")
                raise DataError(f"{self.benchmark}/{self.shift}: the {name} split is empty: "
                                f"set {hint} to at least 1")
            labels = split.labels
            if labels.min() < 0 or labels.max() >= self.num_classes:
                raise DataError(f"{self.benchmark}/{self.shift}: {name} labels must lie in "
                                f"[0, {self.num_classes}), got [{int(labels.min())}, {int(labels.max())}]")


@dataclass
class SourceData:
    """What a source model is pretrained on."""

    benchmark: str
    num_classes: int
    in_channels: int
    train: Split
    test: Split


def class_balanced_indices(labels: torch.Tensor, per_class: int | Sequence[int],
                           generator: torch.Generator, exclude: torch.Tensor | None = None,
                           what: str = "split") -> torch.Tensor:
    """Draw `per_class` indices of each class without replacement.

    Args:
        labels: int64 (n,).
        per_class: one count for every class present in `labels`, or a count for each
            class 0, 1, ..., len(per_class) - 1 (a class with no example left is then an
            error, never silently skipped).
        generator: seeded, so the same seed draws the same indices.
        exclude: bool mask (n,) of indices already used by another split.

    Returns: int64 indices, grouped by class, each class in random order.
    Raises DataError when a class has too few examples left.
    """
    if isinstance(per_class, int):
        classes = torch.unique(labels).tolist()
        counts = [per_class] * len(classes)
    else:
        counts = list(per_class)
        classes = list(range(len(counts)))
    available = torch.ones(len(labels), dtype=torch.bool) if exclude is None else ~exclude
    chosen = []
    for c, count in zip(classes, counts):
        # a negative count would slice off the pool's last images: a split silently wrong
        check_int(f"{what}: the count of class {c}", count, minimum=0, error=DataError)
        pool = torch.nonzero((labels == c) & available).flatten()
        if len(pool) < count:
            raise DataError(f"{what}: class {c} has {len(pool)} examples left, {count} requested")
        chosen.append(pool[torch.randperm(len(pool), generator=generator)[:count]])
    return torch.cat(chosen) if chosen else torch.empty(0, dtype=torch.long)


def draw_splits(labels: torch.Tensor, num_classes: int, n_target: int, val_per_class: int,
                test_per_class: int, seed: int,
                what: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Disjoint class-balanced (train, val, test) indices into `labels`, as the reference
    protocol draws them: `n_target` training images spread over the classes as evenly
    as possible, `val_per_class` and `test_per_class` images of every class.

    Drawn in the order test, val, train from one generator seeded by `seed`, so a
    seed's test and validation sets do not depend on `n_target`, and its training sets
    are nested as `n_target` grows (what an n_target sweep needs).
    Raises DataError when a class is missing or has too few images.
    """
    for name, value in (("n_target", n_target), ("val_per_class", val_per_class),
                        ("test_per_class", test_per_class)):
        check_int(name, value, error=DataError)
    g = seeded(seed)
    used = torch.zeros(len(labels), dtype=torch.bool)
    out = {}
    for name, count in (("test", [test_per_class] * num_classes),
                        ("val", [val_per_class] * num_classes),
                        ("train", split_counts(n_target, num_classes))):
        out[name] = class_balanced_indices(labels, count, g, exclude=used,
                                           what=f"{what} ({name} split)")
        used[out[name]] = True
    return out["train"], out["val"], out["test"]


def split_counts(total: int, num_classes: int) -> list[int]:
    """Spread `total` over classes as evenly as possible (the first classes get the remainder)."""
    base, extra = divmod(total, num_classes)
    return [base + (c < extra) for c in range(num_classes)]


def folder_problem(path: Path) -> str | None:
    """None if `path` is a folder; else what is wrong with it, worded for a data-folder
    error ("data directory X does not exist" is wrong about a file)."""
    if path.is_dir():
        return None
    return "is a file, not a folder" if path.exists() else "does not exist"


def seeded(seed: int) -> torch.Generator:
    """A generator seeded by `seed`, an integer in [0, 2**64) (a DataError otherwise: a
    float would be truncated, a negative seed wrap around)."""
    return torch.Generator().manual_seed(check_seed("seed", seed, error=DataError, bits=64))


def to_float_images(array: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (n, H, W) or (n, H, W, C) in [0, 255] -> normalised float32 (n, C, H, W)."""
    x = torch.from_numpy(np.ascontiguousarray(array)).float().div_(255.0)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        x = x.permute(0, 3, 1, 2).contiguous()
    else:
        raise DataError(f"images must have shape (n, H, W) or (n, H, W, C), got {tuple(array.shape)}")
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - m) / s


@dataclass(frozen=True)
class Benchmark:
    """A registered benchmark. Each data module lists its own in `BENCHMARKS`.

    Attributes:
        name: registry name used by the CLI, configs and results CSV.
        shifts: every shift the benchmark offers (e.g. all corruptions).
        num_classes, in_channels: what the model must predict / take.
        layout: the on-disk layout expected under --data-dir, quoted in errors and docs/benchmarks.md.
        load_task: (data_dir, shift, n_target, val_per_class, test_per_class, seed,
            **options) -> ShiftTask. `data_dir` is a Path or None (None: use the
            benchmark's default location, or fail naming the layout).
        load_source: (data_dir, **options) -> SourceData, for benchmarks whose source
            model this project pretrains itself; None otherwise.
        has_groups: whether splits carry groups (worst-group accuracy).
        pretrained: optional (arch, data_dir) -> Path of a ready source checkpoint
            (verified against its manifest); the sweep uses it when no --checkpoint
            is given.
        source_recipe: optional pretraining settings (`deep.pretrain.PretrainConfig`
            fields) of a source model that the engine trains on the fly and caches
            (`deep.pretrain.cached_source_model`), for benchmarks small enough for that.
        default_data_dir: optional () -> Path, the folder the loaders read when given no
            data_dir (e.g. from an environment variable); a Ray sweep resolves it on
            the driver, so every node reads the folder the driver would.
        normalization: (mean, std) per channel the loaders map pixels in [0, 1] with
            when given no `normalization` option (their own statistics); None: not
            known (online MEMO, which augments pixels, then refuses the benchmark).
        check_data_dir: optional (data_dir) -> None raising when no folder can be right
            (synthetic: any folder); commands call it before anything starts (a Ray
            cluster, a source model), the loaders again when called directly.
        check_shift_files: optional (data_dir, shifts) -> None raising a DataError that
            names every one of `shifts` whose files are missing (a partial download);
            a local sweep or adaptation calls it (`check_local_data`) before anything
            runs, so that it stops at once, not after hours on the shifts before.
    """

    name: str
    shifts: tuple[str, ...]
    num_classes: int
    in_channels: int
    layout: str
    load_task: Callable[..., ShiftTask]
    load_source: Callable[..., SourceData] | None = None
    has_groups: bool = False
    pretrained: Callable[..., Path] | None = None
    source_recipe: Mapping[str, object] | None = None
    normalization: Normalization | None = None
    default_data_dir: Callable[[], Path] | None = None
    check_data_dir: Callable[[Path | str | None], None] | None = None
    check_shift_files: Callable[[Path | str | None, Sequence[str]], None] | None = None

    def check_local_data(self, data_dir: Path | str | None, shifts: Sequence[str]) -> None:
        """DataError, before a local run starts anything (a model, a progress bar): a given
        data folder that does not exist (a typo in --data-dir), and, where the benchmark
        can tell (`check_shift_files`), a shift whose files are missing. A Ray run checks
        the folder on its nodes instead (deep.ray_backend): the driver need not hold it."""
        if data_dir is not None:
            problem = folder_problem(Path(data_dir).expanduser())
            if problem:
                raise DataError(f"{self.name}: data directory {data_dir} {problem}; "
                                f"expected:\n{self.layout}")
        if self.check_shift_files is not None:
            self.check_shift_files(data_dir, shifts)

    def check_shifts(self, shifts: str | Iterable[str]) -> None:
        """ConfigError naming every shift (one name, or several) this benchmark does not
        offer, and the shifts it does. The one check of a shift name: the sweep and the
        adaptation runner call it before anything runs, a loader when called directly."""
        if isinstance(shifts, str):
            shifts = [shifts]
        bad = [s for s in shifts if s not in self.shifts]
        if bad:
            raise ConfigError(f"unknown shift(s) {bad} of {self.name}; "
                              f"known: {', '.join(self.shifts)}")
