"""Bad input gets one clear error (or warning), early, naming the file and what is wrong.

Each case builds a tiny dataset (16^3) with one defect and runs the checks the bundle runs in its
``initialize`` (``validate_datalist(s)``, ``check_training_config``, the folder check), or the trainer's
empty-unlabelled fallback. The runs through ``python -m monai.bundle`` are in ``test_bad_inputs_cli.py``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from multicure_monai.data.datalist import validate_datalist, validate_datalists
from multicure_monai.engines.config_checks import check_training_config, check_writable_folders
from multicure_monai.engines.loss_terms import method_loss_terms
from multicure_monai.errors import BundleInputError, find_bundle_input_error
from multicure_monai.engines.semi_supervised_trainer import SemiSupervisedTrainer
from multicure_monai.losses.pseudo_label import PseudoLabelLoss

REPO = Path(__file__).resolve().parents[2]
TRAIN, EVALUATE, INFER = (REPO / "bundle" / "configs" / f for f in ("train.yaml", "evaluate.yaml", "inference.yaml"))
S = 16


def _nii(path: Path, array: np.ndarray, spacing: tuple[float, ...] = (1.0, 1.0, 1.0)) -> str:
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), str(path))
    return str(path)


def _good(tmp: Path, name: str = "case") -> dict:
    rng = np.random.default_rng(0)
    label = np.zeros((S, S, S), np.uint8)
    label[4:10, 4:10, 4:10] = 1
    image = (label + 0.2 * rng.standard_normal(label.shape)).astype(np.float32)
    return {"image": _nii(tmp / f"{name}_img.nii.gz", image), "label": _nii(tmp / f"{name}_lab.nii.gz", label)}


def _truncate(path: str) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 3])


# Each case: (id, make(tmp) -> (item, label_key, kwargs), expected fragment, "error" | "warning", which file)
def _missing(tmp):
    item = _good(tmp)
    Path(item["image"]).unlink()
    return item, "label", {}, "image"


def _corrupt_nifti(tmp):
    item = _good(tmp)
    _truncate(item["image"])
    return item, "label", {}, "image"


def _corrupt_h5(tmp):
    path = tmp / "mri_norm2.h5"
    with h5py.File(path, "w") as f:
        f["image"] = np.random.default_rng(0).standard_normal((S, S, S)).astype(np.float32)
        f["label"] = np.zeros((S, S, S), np.uint8)
    _truncate(str(path))
    return {"image": str(path), "label": str(path)}, "label", {}, "image"


def _not_3d(tmp):
    item = _good(tmp)
    _nii(Path(item["image"]), np.zeros((S, S), np.float32))
    return item, "label", {}, "image"


def _channels(tmp):
    item = _good(tmp)
    _nii(Path(item["image"]), np.zeros((S, S, S, 2), np.float32))
    return item, "label", {}, "image"


def _label_values(tmp):
    item = _good(tmp)
    label = np.zeros((S, S, S), np.uint8)
    label[2:6, 2:6, 2:6] = 3
    _nii(Path(item["label"]), label)
    return item, "label", {}, "label"


def _shape_mismatch(tmp):
    item = _good(tmp)
    label = np.zeros((S, S, S - 4), np.uint8)
    label[2:6, 2:6, 2:6] = 1
    _nii(Path(item["label"]), label)
    return item, "label", {}, "label"


def _empty_label(tmp):
    item = _good(tmp)
    _nii(Path(item["label"]), np.zeros((S, S, S), np.uint8))
    return item, "label", {}, "label"


def _good_with_bad_voxel(tmp, value: float) -> dict:
    """A good case whose image holds one non-finite voxel."""
    item = _good(tmp)
    image = np.ones((S, S, S), np.float32)
    image[3, 3, 3] = value
    _nii(Path(item["image"]), image)
    return item


def _nan_image(tmp):
    return _good_with_bad_voxel(tmp, np.nan), "label", {}, "image"


def _inf_image(tmp):
    item = _good_with_bad_voxel(tmp, np.inf)
    return {"image": item["image"]}, None, {}, "image"  # an unlabelled case


def _small_image(tmp):
    item = _good(tmp)
    return item, "label", {"roi_size": (24, 16, 8)}, "image"


def _other_grid(tmp):
    """The label at 5x the image's spacing, same shape: a mask drawn on another grid."""
    item = _good(tmp)
    label = np.asarray(nib.load(item["label"]).dataobj)
    _nii(Path(item["label"]), label, spacing=(5.0, 5.0, 5.0))
    return item, "label", {}, "label"


def _anisotropic(tmp):
    item = _good(tmp)
    for key in ("image", "label"):
        _nii(Path(item[key]), np.asarray(nib.load(item[key]).dataobj), spacing=(0.2, 0.2, 10.0))
    return item, "label", {}, "image"


CASES = [
    ("missing file", _missing, "image file not found", "error"),
    ("corrupt NIfTI", _corrupt_nifti, "cannot be read, corrupt or truncated?", "error"),
    ("truncated h5", _corrupt_h5, "cannot be read, corrupt or truncated?", "error"),
    ("image not 3D", _not_3d, "image is not 3D", "error"),
    ("wrong channel count", _channels, "image has 2 channels, expected in_channels=1", "error"),
    ("label values outside classes", _label_values, "label values outside {0..1} for num_classes=2: 3", "error"),
    ("image/label shape mismatch", _shape_mismatch, "label spatial shape (16, 16, 12) differs from image", "error"),
    ("all-empty label", _empty_label, "label is empty (all background)", "warning"),
    ("NaN in image", _nan_image, "image contains NaN/Inf values (1 NaN, 0 Inf)", "error"),
    ("Inf in unlabelled image", _inf_image, "image contains NaN/Inf values (0 NaN, 1 Inf)", "error"),
    ("patch larger than image", _small_image,
     "1 image is smaller than the patch roi_size=(24, 16, 8); zero-padded before cropping", "warning"),
    ("label on another grid", _other_grid,
     "label grid differs from image", "error"),
    ("anisotropic voxels", _anisotropic,
     "strongly anisotropic voxels (largest spacing > 5 x smallest)", "warning"),
]  # fmt: skip


@pytest.mark.parametrize("name, make, expected, kind", CASES, ids=[c[0] for c in CASES])
def test_bad_datalist_entry(tmp_path: Path, name: str, make, expected: str, kind: str) -> None:
    item, label_key, kwargs, role = make(tmp_path)
    path = item[role]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if kind == "error":
            with pytest.raises((ValueError, FileNotFoundError)) as err:
                validate_datalist([item], label_key=label_key, num_classes=2, in_channels=1, **kwargs)
            message = str(err.value)
            assert message.count("\n") == 1, f"expected exactly one problem:\n{message}"
        else:
            validate_datalist([item], label_key=label_key, num_classes=2, in_channels=1, **kwargs)
            messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
            assert len(messages) == 1, messages
            message = messages[0]
    print(f"[{name}] {message}")
    assert expected in message
    assert path in message, f"the message does not name {path}: {message}"


@pytest.mark.parametrize(
    "override, expected",
    [
        ({"unlabelled": {"pseudo_label_threshold": 1.5}},
         "unlabelled#pseudo_label_threshold=1.5: must be a number in the open interval (0, 1) "
         "(override with --unlabelled#pseudo_label_threshold)"),
        ({"uncertainty_threshold": 0.0}, "uncertainty_threshold=0.0: must be a number in the open interval (0, 1)"),
        ({"max_iterations": -300}, "max_iterations=-300: must be a positive integer (override with --max_iterations)"),
        ({"val_interval": 0}, "val_interval=0: must be a positive integer"),
        ({"checkpoint_interval": 3}, "checkpoint_interval=3: must be a positive multiple of val_interval=2"),
        ({"optim": {"learning_rate": -0.01}}, "optim#learning_rate=-0.01: must be a positive number"),
        ({"contrastive": {"lambda_c": -1.0}}, "contrastive#lambda_c=-1.0: must be a non-negative number"),
        ({"num_classes": 1}, "num_classes=1: must be an integer >= 2"),
        ({"sw_stride": [48, 16, 16]}, "sw_stride=[48, 16, 16]: must not exceed roi_size=[32, 32, 32]"),
        ({"contrastive": {"use": "false"}},
         "contrastive#use='false': must be True or False (capitalised on the command line: --contrastive#use False)"),
        ({"multicure": {"form": "sk"}}, "multicure#form='sk': must be one of ['authors', 'paper']"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else "",
)  # fmt: skip
def test_config_value_out_of_range(override: dict, expected: str) -> None:
    values = dict(max_iterations=4, val_interval=2, checkpoint_interval=2, roi_size=[32] * 3, sw_stride=[16] * 3)
    assert check_training_config(values)
    with pytest.raises(ValueError) as err:
        check_training_config({**values, **override})
    print(f"[{override}] {err.value}")
    assert expected in str(err.value)
    assert str(err.value).startswith("config check failed with 1 value out of range")


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1)

    def forward(self, x, uncertainty=None, return_features=False):
        return self.conv(x)


@pytest.mark.parametrize("mode", ["warn", "error"])
def test_empty_unlabelled_set(mode: str) -> None:
    net, aux = _Net(), _Net()
    kwargs = dict(
        device="cpu", max_epochs=1, train_data_loader=DataLoader([{"image": torch.zeros(1, 4, 4, 4)}]),
        unlabeled_data_loader=DataLoader([]), network=net, aux_network=aux,
        optimizer=torch.optim.SGD(list(net.parameters()) + list(aux.parameters()), lr=0.1),
        loss_terms=method_loss_terms(nn.MSELoss(), PseudoLabelLoss()), empty_unlabeled=mode,
    )  # fmt: skip
    if mode == "warn":
        with pytest.warns(UserWarning, match="no unlabelled data.*falls back to supervised-only") as rec:
            trainer = SemiSupervisedTrainer(**kwargs)
        assert trainer.supervised_only
        print(f"[empty unlabelled, warn] {rec[0].message}")
    else:
        with pytest.raises(ValueError, match=r"no unlabelled data.*\(empty_unlabeled='error'\)") as err:
            SemiSupervisedTrainer(**kwargs)
        print(f"[empty unlabelled, error] {err.value}")


def test_all_lists_in_one_error(tmp_path: Path) -> None:
    """A missing training label, a missing unlabelled image and a validation label on another grid: one message."""
    cases = [_good(tmp_path, f"c{i}") for i in range(3)]
    Path(cases[0]["label"]).unlink()
    Path(cases[1]["image"]).unlink()
    _nii(Path(cases[2]["label"]), np.zeros((S, S, S), np.uint8), spacing=(1.0, 1.0, 2.0))
    lists = {"training": cases[:1], "unlabeled": [{"image": cases[1]["image"]}], "validation": cases[2:]}
    with pytest.raises(BundleInputError) as err:
        validate_datalists(lists, unlabelled_lists=["unlabeled"], patch_lists=["training"], roi_size=(16, 16, 16))
    message = str(err.value)
    print(message)
    assert message.startswith("datalist check (training, unlabeled, validation) failed with 3 problems:")
    assert f"training: {cases[0]['label']}: label file not found" in message
    assert f"unlabeled: {cases[1]['image']}: image file not found" in message
    assert f"validation: {cases[2]['label']}: label grid differs from image" in message
    assert "spacing (1, 1, 2) vs image (1, 1, 1)" in message and "ResampleToMatch" in message


@pytest.mark.parametrize("shift, tolerated", [(1e-5, True), (0.5, False)])
def test_label_origin_within_tolerance(tmp_path: Path, shift: float, tolerated: bool) -> None:
    item = _good(tmp_path)
    label = nib.load(item["label"])
    affine = label.affine.copy()
    affine[0, 3] += shift
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), affine), item["label"])
    if tolerated:
        validate_datalist([item])
    else:
        with pytest.raises(BundleInputError, match=r"label grid differs from image .*\(origin \(0\.5, 0, 0\) vs"):
            validate_datalist([item])


def test_empty_labels_one_warning_with_the_count(tmp_path: Path) -> None:
    items = [_good(tmp_path, f"c{i}") for i in range(4)]
    for item in items[:3]:
        _nii(Path(item["label"]), np.zeros((S, S, S), np.uint8))
    with pytest.warns(UserWarning) as rec:
        assert validate_datalists({"training": items[:2], "validation": items[2:]})
    messages = [str(w.message) for w in rec if "empty" in str(w.message)]
    assert len(messages) == 1, messages
    assert messages[0].startswith("label is empty (all background) in 3 of 4 labels: ")
    assert all(item["label"] in messages[0] for item in items[:3]) and items[3]["label"] not in messages[0]


@pytest.mark.parametrize("configs", [["train.yaml"], ["train.yaml", "evaluate.yaml"], ["inference.yaml"]])
def test_each_workflow_checks_its_own_lists(tmp_path: Path, configs: list[str]) -> None:
    """Training checks all three lists, evaluating the validation list, inference its input images."""
    from monai.bundle import ConfigParser

    cases = [_good(tmp_path, f"c{i}") for i in range(3)]
    for case in cases:
        Path(case["label"]).unlink()  # no label anywhere: only a list read with labels fails
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": cases[:1], "unlabeled": cases[1:2], "validation": cases[2:]}))
    parser = ConfigParser()
    parser.read_config([str(REPO / "bundle" / "configs" / c) for c in configs])
    parser.update({"bundle_root": str(tmp_path / "root"), "datalist": str(datalist)})
    expected = {"train.yaml": ["training", "validation"], "evaluate.yaml": ["validation"]}.get(configs[-1])
    if expected is None:
        assert parser.get_parsed_content("checks#datalist")
        return
    with pytest.raises(RuntimeError) as err:  # MONAI wraps the error of a component
        parser.get_parsed_content("checks#datalist")
    error = find_bundle_input_error(err.value)
    assert isinstance(error, FileNotFoundError), err.value
    assert [ln.split(":")[0].strip() for ln in str(error).splitlines()[1:]] == expected, str(error)


@pytest.mark.parametrize("config", ["inference.yaml", "train.yaml"])
def test_validation_and_inference_pad_an_image_smaller_than_the_patch(config: str) -> None:
    """The sliding-window inferer of validation and inference pads a small image and returns its own shape."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundle" / "configs" / config))
    parser.update({"roi_size": [32, 32, 32], "sw_stride": [16, 16, 16], "sw_batch_size": 1})
    inferer = parser.get_parsed_content("inferer")
    image = torch.rand(1, 1, 16, 40, 8)
    out = inferer(image, lambda x: torch.cat([x, 1 - x], dim=1))
    assert out.shape == (1, 2, 16, 40, 8)
    torch.testing.assert_close(out[:, :1], image)


@pytest.mark.parametrize("where", ["under a regular file", "a regular file", "read-only parent"])
def test_output_folder_not_writable(tmp_path: Path, where: str) -> None:
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a folder")
    ok = tmp_path / "models"
    if where == "under a regular file":
        bad, expected = blocker / "eval", f"is under {blocker}, which is a regular file, not a folder"
    elif where == "a regular file":
        bad, expected = blocker, "is a regular file, not a folder"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes to read-only folders")
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        bad, expected = locked / "eval", f"folder (its nearest existing parent {locked}) is not writable"
    assert check_writable_folders({"model_dir": ok})
    with pytest.raises(BundleInputError) as err:
        check_writable_folders({"model_dir": ok, "output_dir": bad})
    print(err.value)
    assert str(err.value).startswith("1 output folder cannot be written:")
    assert f"output_dir={bad}: {expected} (choose another folder with --output_dir)" in str(err.value)


# ------------------------------------------------------------------ through the bundle: fails before training
