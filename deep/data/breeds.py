"""Living-17 and Entity-30 (BREEDS, Santurkar et al. 2021): subpopulation shift.

Each BREEDS dataset groups ImageNet classes ("subclasses") into superclasses using a
modified WordNet hierarchy, and splits each superclass's subclasses into a source half and
a target half. Models are trained on the source subclasses and must recognise the same
superclasses in the unseen target subclasses. Labels are superclass indices.

The superclasses and the split are recomputed here from the three BREEDS hierarchy files
(`dataset_class_info.json`, `class_hierarchy.txt`, `node_names.txt`, from
github.com/MadryLab/BREEDS-Benchmarks, imagenet_class_hierarchy/modified/), following
the MadryLab `robustness` library's `breeds_helpers` step by step:

- levels are longest-path depths from the root n00001740 in the graph of ancestors of
  the ImageNet classes;
- Living-17 = `make_living17`: level-5 nodes below n00004258 ("living thing") with at
  least 4 ImageNet descendants, 4 subclasses each; Entity-30 = `make_entity30`: level-4
  nodes with at least 8 descendants, 8 subclasses each; superclasses sorted by wnid;
- split "rand" (the default, and what published BREEDS code calls with):
  `numpy.random.RandomState(2)`, shared across superclasses in sorted order; for each
  superclass, descend while the node has a single child, collect the ImageNet
  descendants of its children, sort them, draw `n_subclasses` with
  `rng.choice(..., replace=False)`; the first half is the source, the second the target.
  "good" and "bad" (the library's other split types) are implemented too.

How sure this is: the algorithm follows the library's source step by step and uses the
same legacy numpy generator, whose streams are frozen across numpy versions. It was run
once (not in CI: the files are not part of this repository) on the real
class_hierarchy.txt, with the hierarchy's 890 sink nodes standing in for
dataset_class_info.json: the nodes per level came out exactly as the BREEDS notebook
prints them (1, 2, 10, 29, 128, 466, 591, 98, 3), Living-17 gave the 17 published
superclasses (salamander, turtle, lizard, snake, spider, grouse, parrot, crab, dog, wolf,
fox, domestic cat, bear, beetle, butterfly, ape, monkey) and Entity-30 gave 30. The
source/target subclass lists themselves were not compared with a published copy (none
was at hand). The loader verifies the counts (17 x 4 and 30 x 8). To use a published
split verbatim, pass the data option
`split_file`: a JSON file {"source": [[wnid, ...], ...], "target": [[wnid, ...], ...]}
(one list per superclass, same order, optional "names"), e.g. written from the
robustness library's output after mapping class numbers to wnids.

Images: the ImageNet train folder gives the source training set and the target training
and validation draws; the ImageNet val folder (arranged in wnid folders) gives the test
sets (50 images per subclass).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from .base import (Benchmark, DataError, FileSplit, ShiftTask, SourceData,
                   class_balanced_indices, folder_problem, seeded, split_counts)
from .images import (IMAGENET_MEAN, IMAGENET_STD, ImageTransform, check_all_classes, list_images,
                     read_text, require_file)

ROOT_WNID = "n00001740"
INFO_FILES = ("dataset_class_info.json", "class_hierarchy.txt", "node_names.txt")
INFO_DIRS = ("imagenet_class_hierarchy/modified", "breeds", "BREEDS")


@dataclass(frozen=True)
class Recipe:
    """One BREEDS dataset, as `robustness.tools.breeds_helpers.make_<name>` defines it."""

    level: int
    ancestor: str | None
    n_subclasses: int
    num_superclasses: int


RECIPES = {
    "living17": Recipe(level=5, ancestor="n00004258", n_subclasses=4, num_superclasses=17),
    "entity30": Recipe(level=4, ancestor=None, n_subclasses=8, num_superclasses=30),
}

LAYOUT = """\
ImageNet (ILSVRC2012, https://image-net.org) in class folders, plus the BREEDS hierarchy:
  <data-dir>/train/<wnid>/*.JPEG          the ImageNet training set
  <data-dir>/val/<wnid>/*.JPEG            the validation set, moved into wnid folders
  <data-dir>/imagenet_class_hierarchy/modified/   (or <data-dir>/breeds/, or the data
      dataset_class_info.json                     option info_dir = any folder, absolute
                                                  or inside <data-dir>)
      class_hierarchy.txt
      node_names.txt
  (hierarchy files: github.com/MadryLab/BREEDS-Benchmarks, imagenet_class_hierarchy/modified)
  Only the wnids of the chosen superclasses' subclasses need to be present."""


# ---------------------------------------------------------------- the hierarchy

class Hierarchy:
    """The BREEDS class hierarchy restricted to ancestors of the dataset's classes.

    Attributes:
        leaves: ImageNet class wnids, in dataset_class_info.json order.
        children: node -> its children (only edges into leaves or their ancestors).
        level: node -> longest-path depth from the root.
        names: node -> readable name (from node_names.txt and the class info).
    """

    def __init__(self, info_dir: Path):
        self.info_dir = info_dir
        class_info = self._read_class_info(info_dir / "dataset_class_info.json")
        self.leaves = [wnid for _, wnid, _ in class_info]
        self.leaf_set = set(self.leaves)
        self.names = {wnid: name for _, wnid, name in class_info}
        self.names.update(self._read_node_names(info_dir / "node_names.txt"))
        edges = self._read_edges(info_dir / "class_hierarchy.txt")
        self.children = self._ancestor_graph(edges)
        self.level = self._levels()

    # -- parsing
    @staticmethod
    def _read_class_info(path: Path) -> list[tuple[int, str, str]]:
        require_file(path, LAYOUT, "breeds")
        try:
            raw = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise DataError(f"breeds: {path} is not valid JSON ({err})") from None
        if not isinstance(raw, list) or not raw:
            raise DataError(f"breeds: {path} must be a non-empty JSON list of "
                            f"[class number, wnid, name] entries")
        out = []
        for i, entry in enumerate(raw):
            if (not isinstance(entry, list) or len(entry) < 3 or not isinstance(entry[0], int)
                    or not isinstance(entry[1], str)):
                raise DataError(f"breeds: entry {i} of {path} must be [class number, wnid, "
                                f"name], got {entry!r}")
            out.append((entry[0], entry[1], str(entry[2])))
        return out

    @staticmethod
    def _read_node_names(path: Path) -> dict[str, str]:
        names = {}
        for number, line in enumerate(read_text(path, LAYOUT, "breeds").splitlines(), 1):
            if not line.strip():
                continue
            fields = line.strip().split("\t")
            if len(fields) < 2:
                raise DataError(f"breeds: line {number} of {path} must be "
                                f"'<wnid><TAB><name>', got {line!r}")
            names[fields[0]] = fields[1]
        return names

    @staticmethod
    def _read_edges(path: Path) -> list[tuple[str, str]]:
        edges = []
        for number, line in enumerate(read_text(path, LAYOUT, "breeds").splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise DataError(f"breeds: line {number} of {path} must be "
                                f"'<parent wnid> <child wnid>', got {line!r}")
            edges.append((fields[0], fields[1]))
        if not edges:
            raise DataError(f"breeds: {path} holds no edges")
        return edges

    # -- structure
    def _ancestor_graph(self, edges) -> dict[str, dict[str, None]]:
        """Keep the edges p -> w whose child w is a class or an ancestor of one."""
        parents: dict[str, list[str]] = {}
        for p, c in edges:
            parents.setdefault(c, []).append(p)
        children: dict[str, dict[str, None]] = {}
        frontier = [w for w in self.leaves if w in parents]
        seen = set(frontier)
        while frontier:
            nxt = []
            for w in frontier:
                for p in parents.get(w, ()):
                    children.setdefault(p, {})[w] = None  # dict: ordered, no duplicates
                    if p not in seen:
                        seen.add(p)
                        nxt.append(p)
            frontier = nxt
        if ROOT_WNID not in children:
            raise DataError(f"breeds: the root {ROOT_WNID} is not an ancestor of any class in "
                            f"{self.info_dir / 'class_hierarchy.txt'}")
        return children

    def _levels(self) -> dict[str, int]:
        """Longest-path depth from the root (the library keeps the longest path too)."""
        reach, stack = set(), [ROOT_WNID]
        while stack:
            n = stack.pop()
            if n not in reach:
                reach.add(n)
                stack.extend(self.children.get(n, ()))
        indegree = dict.fromkeys(reach, 0)
        for n in reach:
            for c in self.children.get(n, ()):
                indegree[c] += 1
        level, ready = {ROOT_WNID: 0}, [ROOT_WNID]
        while ready:
            n = ready.pop()
            for c in self.children.get(n, ()):
                level[c] = max(level.get(c, 0), level[n] + 1)
                indegree[c] -= 1
                if indegree[c] == 0:
                    ready.append(c)
        if len(level) != len(reach) or any(indegree.values()):
            raise DataError(f"breeds: {self.info_dir / 'class_hierarchy.txt'} has a cycle")
        return level

    def successors(self, node: str) -> list[str]:
        return sorted(self.children.get(node, ()))

    def leaves_below(self, node: str) -> list[str]:
        """Sorted classes reachable from `node` (the node itself if it is a class)."""
        found, frontier = set(), [node]
        while frontier:
            nxt = set()
            for w in frontier:
                for c in self.children.get(w, ()):
                    if c in self.leaf_set:
                        found.add(c)
                    else:
                        nxt.add(c)
            frontier = list(nxt)
        if node in self.leaf_set:
            found.add(node)
        return sorted(found)

    def nodes_at_level(self, level: int, ancestor: str | None) -> list[str]:
        nodes = [n for n, d in self.level.items() if d == level]
        if ancestor is not None:
            # the library looks at most 20 edges below the ancestor
            within, frontier = {ancestor}, [ancestor]
            for _ in range(20):
                frontier = [c for n in frontier for c in self.children.get(n, ())]
                within.update(frontier)
            nodes = [n for n in nodes if n in within]
        return sorted(nodes)


def _split_superclass(hierarchy: Hierarchy, superclass: str, n_subclasses: int,
                      split_type: str, rng: np.random.RandomState) -> tuple[list[str], list[str]]:
    """Source and target subclasses of one superclass (`split_superclass`, balanced=True)."""
    desc = hierarchy.successors(superclass)
    while len(desc) == 1:  # skip single-child chains
        desc = hierarchy.successors(desc[0])
    groups = {d: hierarchy.leaves_below(d) for d in desc}
    half = n_subclasses // 2
    if split_type == "rand":
        pool = sorted(w for leaves in groups.values() for w in leaves)
        chosen = [str(w) for w in rng.choice(pool, 2 * half, replace=False)]
        source, target = chosen[:half], chosen[half:]
    else:
        source, target, spare = [], [], []
        # biggest child groups first; ties keep wnid order (Python's sort is stable)
        for _, leaves in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            ns, nt = len(source), len(target)
            if split_type == "bad":  # similar subclasses on the same side
                if ns <= nt and ns < half:
                    spare += leaves[half - ns:]
                    source += leaves[:half - ns]
                elif nt < half:
                    spare += leaves[half - nt:]
                    target += leaves[:half - nt]
            else:  # "good": similar subclasses spread over both sides
                cut = (1 if ns < half else 0) if len(leaves) == 1 else min(len(leaves) // 2, half - ns)
                if ns < half:
                    source += leaves[:cut]
                if nt < half:
                    target += leaves[cut:cut + half - nt]
        if split_type == "bad":
            ns, nt = len(source), len(target)
            source += spare[:half - ns] if ns < half else []
            target += spare[:half - nt] if nt < half else []
    if len(source) != half or len(target) != half or set(source) & set(target):
        raise DataError(f"breeds: superclass {superclass} cannot be split into two disjoint "
                        f"halves of {half} subclasses (got {source} / {target})")
    return source, target


def breeds_split(info_dir: Path, name: str, split: str = "rand"):
    """Superclasses and their source / target subclasses, as `make_<name>(info_dir, split)`.

    Returns: (superclass wnids, readable names, source wnid lists, target wnid lists),
    one entry per superclass, superclasses in wnid order (= label order).
    """
    if name not in RECIPES:
        raise ConfigError(f"unknown BREEDS dataset {name!r}; known: {', '.join(RECIPES)}")
    if split not in ("rand", "good", "bad"):
        raise ConfigError(f"split must be 'rand', 'good' or 'bad', got {split!r}")
    recipe = RECIPES[name]
    hierarchy = Hierarchy(Path(info_dir))
    rng = np.random.RandomState(2)
    candidates = hierarchy.nodes_at_level(recipe.level, recipe.ancestor)
    superclasses = [n for n in candidates
                    if len(hierarchy.leaves_below(n)) >= recipe.n_subclasses]
    source, target = [], []
    for sc in superclasses:
        s, t = _split_superclass(hierarchy, sc, recipe.n_subclasses, split, rng)
        source.append(s)
        target.append(t)
    names = [hierarchy.names.get(sc, sc) for sc in superclasses]
    return superclasses, names, source, target


def _read_split_file(path: Path) -> tuple[list[str], list[list[str]], list[list[str]]]:
    what = f"breeds split file {path}"
    require_file(path, "a JSON file {\"source\": [[wnid, ...], ...], \"target\": [[...], ...]}", what)
    try:
        raw = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{what}: not valid JSON ({err})") from None
    if not isinstance(raw, dict) or "source" not in raw or "target" not in raw:
        raise DataError(f"{what}: must be a JSON object with keys 'source' and 'target'")
    source, target = raw["source"], raw["target"]
    ok = (isinstance(source, list) and isinstance(target, list) and len(source) == len(target)
          and source and all(isinstance(g, list) and g and all(isinstance(w, str) for w in g)
                             for g in source + target))
    if not ok:
        raise DataError(f"{what}: 'source' and 'target' must be equally long, non-empty lists "
                        f"of non-empty lists of wnids (one per superclass)")
    names = raw.get("names") or [f"superclass {i}" for i in range(len(source))]
    if len(names) != len(source):
        raise DataError(f"{what}: 'names' has {len(names)} entries, expected {len(source)}")
    for side, groups in (("source", source), ("target", target)):
        listed = [w for g in groups for w in g]
        repeated = sorted({w for w in listed if listed.count(w) > 1})
        if repeated:   # one image folder would be read twice, under two labels
            raise DataError(f"{what}: subclasses listed more than once in '{side}' (each "
                            f"belongs to one superclass): {repeated}")
    overlap = {w for g in source for w in g} & {w for g in target for w in g}
    if overlap:
        raise DataError(f"{what}: subclasses in both source and target: {sorted(overlap)}")
    return [str(n) for n in names], source, target


# ---------------------------------------------------------------- loading

def _info_dir(data_dir: Path, info_dir) -> Path:
    if info_dir is not None:
        candidates = [data_dir / Path(info_dir).expanduser()]  # absolute paths stay absolute
    else:
        candidates = [data_dir / d for d in INFO_DIRS]
    for c in candidates:
        if (c / INFO_FILES[0]).exists():
            return c
    raise DataError(f"breeds: hierarchy files {', '.join(INFO_FILES)} not found in "
                    f"{' or '.join(map(str, candidates))}; expected:\n{LAYOUT}")


def _root(data_dir, name: str) -> Path:
    if data_dir is None:
        raise DataError(f"{name}: no data directory given; pass --data-dir pointing at:\n{LAYOUT}")
    root = Path(data_dir).expanduser()
    problem = folder_problem(root)
    if problem:
        raise DataError(f"{name}: data directory {root} {problem}; expected:\n{LAYOUT}")
    return root


def _subclasses(root: Path, name: str, info_dir, split: str, split_file,
                expected_superclasses: int) -> tuple[list[str], list[list[str]], list[list[str]]]:
    if split_file is not None:
        names, source, target = _read_split_file(root / Path(split_file).expanduser())
    else:
        _, names, source, target = breeds_split(_info_dir(root, info_dir), name, split)
        half = RECIPES[name].n_subclasses // 2
        if any(len(g) != half for g in source + target):
            raise DataError(f"{name}: expected {half} source and {half} target subclasses "
                            f"per superclass")
    if len(source) != expected_superclasses:
        raise DataError(f"{name}: the hierarchy gives {len(source)} superclasses, expected "
                        f"{expected_superclasses}; are these the BREEDS 'modified' hierarchy "
                        f"files? (expected_superclasses is a data option for fixtures only)")
    return names, source, target


def _images(root: Path, folder: str, groups: list[list[str]],
            name: str) -> tuple[list[Path], torch.Tensor]:
    """Image paths under root/folder/<wnid>/ and their superclass labels."""
    paths, labels = [], []
    for label, wnids in enumerate(groups):
        for wnid in wnids:
            files = list_images(root / folder / wnid, LAYOUT, name)
            paths += files
            labels += [label] * len(files)
    return paths, torch.tensor(labels, dtype=torch.int64)


def load_breeds_task(name: str, data_dir, shift: str, n_target: int, val_per_class: int,
                     test_per_class: int, seed: int, info_dir=None, split: str = "rand",
                     split_file=None, expected_superclasses: int | None = None,
                     resize: int | None = 256, crop: int = 224,
                     num_workers: int = 0) -> ShiftTask:
    """Target task: the target subclasses, labelled by superclass.

    train (n_target, class balanced) and val (val_per_class) are drawn disjointly from
    the ImageNet train images of the target subclasses; test (test_per_class) from their
    ImageNet val images. Drawn test, val, then train from one generator seeded by `seed`.
    """
    BENCHMARKS[name].check_shifts(shift)
    expected = expected_superclasses or RECIPES[name].num_superclasses
    root = _root(data_dir, name)
    names, _, target = _subclasses(root, name, info_dir, split, split_file, expected)
    num_classes = len(target)
    pool_paths, pool_labels = _images(root, "train", target, name)
    test_paths, test_labels = _images(root, "val", target, name)
    check_all_classes(pool_labels, num_classes, f"{name} target train images")
    check_all_classes(test_labels, num_classes, f"{name} target val images")
    # Drawn test, val, then train (as `draw_splits`): a seed's test and validation images
    # do not depend on n_target, and its training sets are nested as n_target grows.
    g = seeded(seed)
    test = class_balanced_indices(test_labels, test_per_class, g, what=f"{name} (test split)")
    val = class_balanced_indices(pool_labels, val_per_class, g, what=f"{name} (val split)")
    used = torch.zeros(len(pool_labels), dtype=torch.bool)
    used[val] = True
    train = class_balanced_indices(pool_labels, split_counts(n_target, num_classes), g,
                                   exclude=used, what=f"{name} (train split)")
    transform = ImageTransform(resize=resize, crop=crop)

    def split_of(paths, labels, idx, part):
        return FileSplit([paths[i] for i in idx.tolist()], labels[idx], None, transform,
                         num_workers=num_workers, name=f"{name}/{part}")

    return ShiftTask(name, shift, num_classes, split_of(pool_paths, pool_labels, train, "train"),
                     split_of(pool_paths, pool_labels, val, "val"),
                     split_of(test_paths, test_labels, test, "test"))


def load_breeds_source(name: str, data_dir, info_dir=None, split: str = "rand", split_file=None,
                       expected_superclasses: int | None = None, resize: int | None = 256,
                       crop: int = 224, num_workers: int = 0) -> SourceData:
    """Source data: every ImageNet train (and, for test, val) image of the source subclasses.

    Deterministic evaluation transform (no augmentation); pretraining code that wants
    augmentation must add it itself.
    """
    expected = expected_superclasses or RECIPES[name].num_superclasses
    root = _root(data_dir, name)
    _, source, _ = _subclasses(root, name, info_dir, split, split_file, expected)
    transform = ImageTransform(resize=resize, crop=crop)
    splits = []
    for folder in ("train", "val"):
        paths, labels = _images(root, folder, source, name)
        splits.append(FileSplit(paths, labels, None, transform, num_workers=num_workers,
                                name=f"{name}/source-{folder}"))
    return SourceData(name, len(source), 3, splits[0], splits[1])


BENCHMARKS = {
    name: Benchmark(name=name, shifts=("subpopulation",), num_classes=recipe.num_superclasses,
                    in_channels=3, layout=LAYOUT, load_task=partial(load_breeds_task, name),
                    load_source=partial(load_breeds_source, name),
                    normalization=(IMAGENET_MEAN, IMAGENET_STD))
    for name, recipe in RECIPES.items()
}
