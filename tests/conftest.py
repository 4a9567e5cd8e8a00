"""Shared fixtures: tiny synthetic phantom data sets on disk for the end-to-end tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from multicure_monai.data.synthetic import generate_phantom_dataset


@pytest.fixture(scope="session")
def make_phantoms(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``make_phantoms(name, **kwargs) -> datalist.json``: a fresh phantom set under a temporary folder.

    Defaults: 2 labelled, 2 unlabelled and 1 validation volume of 36x32x32 (a 32^3 patch still gets cropped);
    keyword arguments go to :func:`~multicure_monai.data.synthetic.generate_phantom_dataset`.
    """

    def make(name: str, **kwargs) -> Path:
        options = dict(num_labelled=2, num_unlabelled=2, num_validation=1, shape=(36, 32, 32), seed=3)
        options.update(kwargs)
        root = tmp_path_factory.mktemp(name)
        return Path(generate_phantom_dataset(root / "data", **options))

    return make
