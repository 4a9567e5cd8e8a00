"""Convert the UA-MT/MCF left-atrium h5 data to NIfTI + datalist JSON (a thin CLI over ``multicure_monai.data.la_h5``).

Examples::

    # 8 labelled (10 %), 16 validation (end of train.list), the other 56 unlabelled; la_half is 1.25 mm
    python bundle/scripts/prepare_la.py convert --data_root la_half \\
        --output_dir la_half_nii --num_labelled 8 --num_validation 16 --spacing 1.25

    # the paper's 5-fold cross-validation: datalist_fold{0..4}.json next to the NIfTI files
    python bundle/scripts/prepare_la.py kfold --source la_half \\
        --output_dir la_half_nii --num_folds 5 --num_labelled 8 --spacing 1.25

    # check a datalist (all problems listed at once)
    python bundle/scripts/prepare_la.py check --datalist la_half_nii/datalist.json
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

try:
    import multicure_monai  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from multicure_monai.data.datalist import DATALIST_KEYS, load_datalist, validate_datalist
from multicure_monai.data.la_h5 import convert_la_h5, kfold_datalists

__all__ = ["convert", "kfold", "check"]


def convert(
    data_root: str,
    output_dir: str,
    train_list: str = "train.list",
    test_list: str | None = "test.list",
    num_labelled: int = 8,
    num_unlabelled: int | None = None,
    num_validation: int = 0,
    spacing: float | Sequence[float] = (0.625, 0.625, 0.625),
    overwrite: bool = False,
) -> str:
    """Convert ``<data_root>/<case>/mri_norm2.h5`` to NIfTI and write ``<output_dir>/datalist.json``.

    See :func:`multicure_monai.data.la_h5.convert_la_h5`. Prints the split sizes; returns the datalist path.
    """
    path = convert_la_h5(
        data_root, output_dir, train_list=train_list, test_list=test_list, num_labelled=num_labelled,
        num_unlabelled=num_unlabelled, num_validation=num_validation, spacing=spacing, overwrite=overwrite,
    )  # fmt: skip
    _summary(path)
    return path


def kfold(
    source: str,
    output_dir: str | None = None,
    num_folds: int = 5,
    num_labelled: int = 8,
    num_unlabelled: int | None = None,
    train_list: str = "train.list",
    spacing: float | Sequence[float] = (0.625, 0.625, 0.625),
    overwrite: bool = False,
) -> list[str]:
    """Write ``datalist_fold{k}.json`` for k-fold cross-validation from an h5 root or a datalist JSON.

    See :func:`multicure_monai.data.la_h5.kfold_datalists`.
    """
    paths = kfold_datalists(
        source, output_dir, num_folds=num_folds, num_labelled=num_labelled, num_unlabelled=num_unlabelled,
        train_list=train_list, spacing=spacing, overwrite=overwrite,
    )  # fmt: skip
    for p in paths:
        _summary(p)
    return paths


def check(datalist: str, num_classes: int = 2, in_channels: int = 1) -> None:
    """Validate every list of a datalist JSON; raises one error listing all problems."""
    for key in DATALIST_KEYS:
        items = load_datalist(datalist, key, missing_ok=True)
        validate_datalist(items, label_key=None if key == "unlabeled" else "label",
                          num_classes=num_classes, in_channels=in_channels)  # fmt: skip
        print(f"{key}: {len(items)} cases OK")


def _summary(path: str) -> None:
    counts = {k: len(load_datalist(path, k, missing_ok=True)) for k in DATALIST_KEYS}
    print(f"{path}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))


if __name__ == "__main__":
    import fire

    fire.Fire({"convert": convert, "kfold": kfold, "check": check})
