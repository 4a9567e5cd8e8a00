"""UncertaintyMapsd: confidence, entropy and binary uncertainty maps with the prediction's metadata."""

from __future__ import annotations

import math

import pytest
import torch
from monai.data import MetaTensor
from monai.data.image_writer import NibabelWriter

import numpy as np

from multicure_monai.data.uncertainty_maps import MAP_NAMES, UncertaintyMapsd, uncertainty_map_savers


def test_maps_have_known_values_and_keep_the_metadata() -> None:
    fg = torch.tensor([0.5, 0.6, 0.9, 1.0]).view(1, 4, 1, 1)
    affine = torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0]))
    probs = MetaTensor(torch.cat([1 - fg, fg]), affine=affine, meta={"filename_or_obj": "case.nii.gz"})
    out = UncertaintyMapsd(keys="pred", threshold=0.7)({"pred": probs})
    torch.testing.assert_close(out["pred_confidence"].as_tensor().flatten(), torch.tensor([0.5, 0.6, 0.9, 1.0]))
    entropy = [-(p * math.log(p) + (1 - p) * math.log(1 - p)) / math.log(2) if 0 < p < 1 else 0.0 for p in (0.5, 0.6, 0.9, 1.0)]
    torch.testing.assert_close(out["pred_entropy"].as_tensor().flatten(), torch.tensor(entropy), atol=1e-6, rtol=1e-5)
    assert out["pred_uncertain"].as_tensor().flatten().tolist() == [1.0, 1.0, 0.0, 0.0]
    for name in ("confidence", "entropy", "uncertain"):
        image = out[f"pred_{name}"]
        assert image.shape == (1, 4, 1, 1)
        torch.testing.assert_close(image.affine, probs.affine)
        assert image.meta["filename_or_obj"] == "case.nii.gz"
    assert out["pred"] is probs  # the probabilities are left for the argmax that follows


def test_only_the_requested_maps_and_valid_arguments() -> None:
    out = UncertaintyMapsd(keys="pred", maps=["entropy"])({"pred": torch.full((2, 3, 3), 0.5)})
    assert set(out) == {"pred", "pred_entropy"}
    with pytest.raises(ValueError):
        UncertaintyMapsd(keys="pred", maps=["variance"])
    with pytest.raises(ValueError):
        UncertaintyMapsd(keys="pred", threshold=1.0)


@pytest.mark.parametrize("maps", [MAP_NAMES, ("uncertain",), ("entropy", "confidence"), ()])
@pytest.mark.parametrize("key", ["pred", "prob"])
def test_uncertainty_map_savers(tmp_path, maps, key) -> None:
    savers = uncertainty_map_savers(maps, str(tmp_path), writer=NibabelWriter, key=key)
    assert [s.keys for s in savers] == [(f"{key}_{m}",) for m in maps]
    for m, s in zip(maps, savers):
        assert s.saver.init_kwargs["output_dtype"] == (np.uint8 if m == "uncertain" else np.float32)
        layout = vars(s.saver.folder_layout)
        assert (layout["output_dir"], layout["postfix"], layout["parent"]) == (str(tmp_path), m, False)
        assert s.saver.meta_kwargs["resample"] is False and s.saver.write_kwargs["verbose"] is False
        assert s.saver.writers == (NibabelWriter,)
