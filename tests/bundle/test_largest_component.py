"""keep_largest_component: one switch puts MONAI's KeepLargestConnectedComponentd into validation / evaluation
(one-hot predictions of the ensemble and of each net) and into inference (label maps), and takes it out again."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import KeepLargestConnectedComponentd

CONFIGS = Path(__file__).resolve().parents[2] / "bundle" / "configs"


def _transforms(files: list[str], key: str, keep: bool) -> list:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in files])
    parser.update({"bundle_root": "/nonexistent", "device": "$torch.device('cpu')", "keep_largest_component": keep})
    parsed = parser.get_parsed_content(key)
    return list(parsed.transforms if hasattr(parsed, "transforms") else parsed)


def _two_blobs() -> torch.Tensor:
    """(1, 12, 12, 12) label map: a 4^3 cube and a separate single voxel of class 1."""
    label = torch.zeros(1, 12, 12, 12)
    label[:, 1:5, 1:5, 1:5] = 1
    label[:, 9, 9, 9] = 1
    return label


WORKFLOWS = [
    (["train.yaml", "evaluate.yaml"], "validate#postprocessing", ["pred", "pred_predictive", "pred_auxiliary"], True),
    (["inference.yaml"], "postprocessing_transforms", ["pred"], False),
]


@pytest.mark.parametrize("files, key, keys, onehot", WORKFLOWS, ids=["evaluate", "inference"])
def test_switch_adds_largest_component(files: list[str], key: str, keys: list[str], onehot: bool) -> None:
    assert not any(isinstance(t, KeepLargestConnectedComponentd) for t in _transforms(files, key, False))
    (lcc,) = [t for t in _transforms(files, key, True) if isinstance(t, KeepLargestConnectedComponentd)]
    assert list(lcc.keys) == keys
    label = _two_blobs()
    pred = torch.cat([1 - label, label]) if onehot else label
    out = lcc({k: pred.clone() for k in keys})
    for k in keys:
        fg = out[k][1] if onehot else out[k][0]
        assert fg.sum() == 64 and fg[9, 9, 9] == 0  # the stray voxel is gone, the cube stays
        if onehot:  # the background channel is left as it was
            assert torch.equal(out[k][0], pred[0])


@pytest.mark.parametrize("base", ["train.yaml", "inference.yaml"])
def test_on_for_the_left_atrium_only(base: str) -> None:
    def value(files: list[str]) -> bool:
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / f) for f in files])
        return parser.get_parsed_content("keep_largest_component")

    assert value([base]) is False and value([base, "pancreas.yaml"]) is False
    assert value([base, "la.yaml"]) is True and value([base, "la.yaml", "la_half.yaml"]) is True
