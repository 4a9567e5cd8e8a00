"""End to end: training -> evaluating -> inference -> ckpt_export through ``python -m monai.bundle``, as users run it.

Tiny synthetic data (a few 32^3 phantoms) and a handful of iterations; the networks are the real ones.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundle" / "configs"
TINY = {
    "max_iterations": "4",
    "val_interval": "2",
    "roi_size": "[32,32,32]",
    "sw_stride": "[16,16,16]",
    "sw_batch_size": "2",
    "num_workers": "0",
}

pytestmark = pytest.mark.slow


def _cli(run_id: str, config_files: list[str], overrides: dict[str, str], cwd: Path = REPO) -> str:
    config = "[" + ",".join(f"'{CONFIGS / c}'" for c in config_files) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config]
    for key, value in overrides.items():
        cmd += [f"--{key}", value]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{run_id} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def trained_bundle(make_phantoms) -> dict[str, Path]:
    datalist = make_phantoms("bundle_root")
    root = datalist.parent.parent
    overrides = {"bundle_root": str(root), "datalist": str(datalist), **TINY}
    log = _cli("training", ["train.yaml"], overrides)
    return {"root": root, "datalist": datalist, "overrides": overrides, "log": log}  # type: ignore[dict-item]


def test_training_writes_deployed_state_dict(trained_bundle: dict) -> None:
    root = trained_bundle["root"]
    model_file = root / "models" / "model.pt"
    assert model_file.is_file()
    assert sorted(p.name for p in (root / "models").glob("*.pt")) == ["model.pt"]
    # one entry in the saver's save_dict ({"model": network_def}): ignite writes the bare state dict
    state = torch.load(model_file, map_location="cpu", weights_only=True)
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.yaml"))
    network = parser.get_parsed_content("network_def")
    assert set(state) == set(network.state_dict())
    network.load_state_dict(state, strict=True)
    for name in ("loss_sup", "loss_pseudo", "loss_contrastive"):
        assert name in trained_bundle["log"]


def test_evaluating_writes_finite_metrics(trained_bundle: dict) -> None:
    root = trained_bundle["root"]
    _cli("evaluating", ["train.yaml", "evaluate.yaml"], trained_bundle["overrides"])
    summary = root / "eval" / "val_mean_dice_summary.csv"
    raw = root / "eval" / "val_mean_dice_raw.csv"
    assert summary.is_file() and raw.is_file(), sorted(p.name for p in (root / "eval").iterdir())
    with open(raw) as f:
        rows = list(csv.reader(f, delimiter=","))
    dice = [float(v) for row in rows[1:] for v in row[1:] if v]
    assert dice and all(np.isfinite(dice)) and all(0.0 <= d <= 1.0 for d in dice)
    for metric in ("val_jaccard", "val_hd95", "val_asd"):
        assert (root / "eval" / f"{metric}_summary.csv").is_file()
    # calibration and uncertainty of the deployed model, per case, in [0, 1]
    for metric in ("val_ece", "val_brier", "val_entropy_band", "val_uncertain_fraction_rest"):
        with open(root / "eval" / f"{metric}_raw.csv") as f:
            values = [float(v) for row in list(csv.reader(f))[1:] for v in row[1:] if v]
        assert values and all(0.0 <= v <= 1.0 for v in values), (metric, values)


def test_inference_writes_masks_with_input_geometry(trained_bundle: dict) -> None:
    root, datalist = trained_bundle["root"], trained_bundle["datalist"]
    overrides = {k: v for k, v in trained_bundle["overrides"].items() if k not in ("max_iterations", "val_interval")}
    _cli("inference", ["inference.yaml"], overrides)
    with open(datalist) as f:
        image_rel = json.load(f)["validation"][0]["image"]
    image_path = datalist.parent / image_rel
    stem = image_path.name.split(".")[0]
    masks = list((root / "eval" / "inference").glob(f"{stem}_seg.nii*"))
    assert len(masks) == 1
    image, mask = nib.load(str(image_path)), nib.load(str(masks[0]))
    assert mask.shape[:3] == image.shape[:3]
    np.testing.assert_allclose(mask.affine, image.affine, atol=1e-4)
    values = np.unique(np.asarray(mask.dataobj))
    assert set(values.tolist()) <= {0, 1}


def test_inference_can_write_uncertainty_maps(trained_bundle: dict, tmp_path: Path) -> None:
    root, datalist = trained_bundle["root"], trained_bundle["datalist"]
    overrides = {k: v for k, v in trained_bundle["overrides"].items() if k not in ("max_iterations", "val_interval")}
    _cli("inference", ["inference.yaml"], {**overrides, "output_dir": str(tmp_path), "save_uncertainty": "True"})
    with open(datalist) as f:
        image_path = datalist.parent / json.load(f)["validation"][0]["image"]
    image = nib.load(str(image_path))
    stem = image_path.name.split(".")[0]
    for name, low, high in (("confidence", 0.5, 1.0), ("entropy", 0.0, 1.0), ("uncertain", 0, 1)):
        (path,) = tmp_path.glob(f"{stem}_{name}.nii*")
        saved = nib.load(str(path))
        values = np.asarray(saved.dataobj)
        assert saved.shape[:3] == image.shape[:3]
        np.testing.assert_allclose(saved.affine, image.affine, atol=1e-4)
        assert values.min() >= low - 1e-6 and values.max() <= high + 1e-6, (name, values.min(), values.max())
    assert set(np.unique(np.asarray(nib.load(str(next(tmp_path.glob(f"{stem}_uncertain.nii*")))).dataobj))) <= {0, 1}


def test_ckpt_export_of_the_deployed_model(trained_bundle: dict, tmp_path: Path) -> None:
    """models/model.pt (both nets) to TorchScript with the command the bundle docs give."""
    root = trained_bundle["root"]
    out = tmp_path / "model.ts"
    cmd = [
        sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def",
        "--filepath", str(out), "--ckpt_file", str(root / "models" / "model.pt"),
        "--meta_file", str(CONFIGS / "metadata.json"), "--config_file", str(CONFIGS / "inference.yaml"),
        "--use_trace", "True", "--input_shape", "[1,1,32,32,32]",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    exported = torch.jit.load(str(out))
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.yaml"))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True))
    net.eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), net(x), atol=1e-4, rtol=1e-4)


def test_bundle_root_defaults_to_repository_bundle() -> None:
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.yaml"))
    cwd = os.getcwd()
    try:
        os.chdir(REPO)
        assert parser.get_parsed_content("bundle_root") == str(REPO / "bundle")
    finally:
        os.chdir(cwd)
