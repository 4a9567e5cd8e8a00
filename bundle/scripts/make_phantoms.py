"""Generate the synthetic phantom dataset (a thin CLI over ``multicure_monai.data.synthetic``).

Examples::

    python bundle/scripts/make_phantoms.py --root bundle/data/phantoms
    python bundle/scripts/make_phantoms.py --root phantoms_96 --num_labelled 8 --num_unlabelled 32 \\
        --shape "[96,96,64]" --seed 1 --overwrite

The bundle itself calls ``ensure_phantom_dataset`` on first use, so this script is only needed for other
sizes or to regenerate.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence

try:
    import multicure_monai  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from multicure_monai.data.synthetic import generate_phantom_dataset

__all__ = ["main"]


def main(
    root: str,
    num_labelled: int = 4,
    num_unlabelled: int = 16,
    num_validation: int = 4,
    shape: Sequence[int] = (64, 64, 48),
    seed: int = 0,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    overwrite: bool = False,
) -> str:
    """Write phantoms and ``<root>/datalist.json``; see :func:`generate_phantom_dataset`. Returns the datalist path."""
    start = time.perf_counter()
    path = generate_phantom_dataset(
        root, num_labelled=num_labelled, num_unlabelled=num_unlabelled, num_validation=num_validation,
        shape=tuple(shape), seed=seed, overwrite=overwrite, spacing=tuple(spacing),
    )  # fmt: skip
    n = num_labelled + num_unlabelled + num_validation
    print(f"{path}: {n} phantoms {tuple(shape)} in {time.perf_counter() - start:.1f} s")
    return path


if __name__ == "__main__":
    import fire

    fire.Fire(main)
