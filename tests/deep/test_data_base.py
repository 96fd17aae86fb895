"""deep.data.base: the class-balanced draws every loader relies on."""

from __future__ import annotations

import pytest
import torch

from deep.data.base import DataError, class_balanced_indices, draw_splits, seeded


def test_per_class_counts_line_up_with_class_indices_even_when_a_class_is_absent():
    labels = torch.tensor([0, 0, 0, 2, 2, 2])           # class 1 missing
    with pytest.raises(DataError, match="class 1 has 0 examples left, 1 requested"):
        class_balanced_indices(labels, [1, 1, 1], seeded(0))
    idx = class_balanced_indices(labels, [2, 0, 1], seeded(0))
    assert labels[idx].tolist() == [0, 0, 2]


def test_draw_splits_are_disjoint_balanced_nested_and_seeded():
    labels = torch.arange(10).repeat(50)                 # 10 classes x 50 images
    small = draw_splits(labels, 10, 30, 2, 5, seed=3, what="t")
    large = draw_splits(labels, 10, 100, 2, 5, seed=3, what="t")
    train, val, test = large
    assert len(set(train.tolist()) | set(val.tolist()) | set(test.tolist())) == 100 + 20 + 50
    assert torch.bincount(labels[train]).tolist() == [10] * 10
    assert torch.equal(small[2], test) and torch.equal(small[1], val)   # test/val fixed by seed
    assert set(small[0].tolist()) <= set(train.tolist())                # nested training sets
    assert not torch.equal(draw_splits(labels, 10, 30, 2, 5, seed=4, what="t")[2], test)
    with pytest.raises(ValueError, match="val_per_class must be at least 1"):
        draw_splits(labels, 10, 30, 0, 5, seed=3, what="t")
