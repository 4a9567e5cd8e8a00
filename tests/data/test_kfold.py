"""The k-fold blocks of :mod:`multicure_monai.data.kfold` are numpy's ``array_split`` blocks, fold for fold."""

from __future__ import annotations

import pytest

from multicure_monai.data.kfold import kfold_split


def _reference_block(n: int, num_folds: int, fold: int) -> list[int]:
    """The contiguous blocks written out: the first ``n % num_folds`` folds are one longer than the rest."""
    base, extra = divmod(n, num_folds)
    start = fold * base + min(fold, extra)
    return list(range(start, start + base + (1 if fold < extra else 0)))


@pytest.mark.parametrize(
    "n, num_folds", [(n, k) for n in (2, 7, 10, 16, 33, 80, 82, 101) for k in (2, 3, 4, 5, 7) if n >= k]
)
def test_folds_equal_the_contiguous_blocks(n: int, num_folds: int) -> None:
    items = [f"case{i:03d}" for i in range(n)]
    for fold in range(num_folds):
        train, val = kfold_split(items, num_folds, fold)
        expected = _reference_block(n, num_folds, fold)
        assert val == [items[i] for i in expected]
        assert train == [items[i] for i in range(n) if i not in expected]


@pytest.mark.parametrize("n, num_folds", [(3, 4), (0, 2)])
def test_fewer_items_than_folds(n: int, num_folds: int) -> None:
    with pytest.raises(ValueError, match="cannot split"):
        kfold_split(list(range(n)), num_folds, 0)
