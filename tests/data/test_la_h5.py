from __future__ import annotations

import json
import os

import h5py
import nibabel as nib
import numpy as np
import pytest
from monai.transforms import LoadImage

from multicure_monai.data.datalist import load_datalist, validate_datalist
from multicure_monai.data.la_h5 import H5_NAME, convert_la_h5, kfold_datalists, read_case_list, read_la_h5


def _case(path: str) -> str:
    return os.path.basename(path).split(".")[0]


def _write_case(root, case, shape=(7, 6, 5), seed=0):
    rng = np.random.default_rng(seed)
    image = rng.standard_normal(shape).astype(np.float32)
    label = (rng.random(shape) > 0.7).astype(np.uint8)
    os.makedirs(root / case, exist_ok=True)
    with h5py.File(root / case / H5_NAME, "w") as f:
        f["image"], f["label"] = image, label
    return image, label


@pytest.fixture
def la_root(tmp_path):
    """A fake UA-MT root: 10 train cases with distinct (non-cubic) shapes, 2 test cases."""
    root = tmp_path / "la"
    cases = [f"CASE{i:02d}" for i in range(10)]
    for i, c in enumerate(cases):
        _write_case(root, c, shape=(7 + i % 3, 6, 5), seed=i)
    (root / "train.list").write_text("\n".join(cases) + "\n\n")
    for i, c in enumerate(["TEST0", "TEST1"]):
        _write_case(root, c, seed=100 + i)
    (root / "test.list").write_text("TEST0\nTEST1\n")
    return root


def test_read_la_h5_roundtrip(tmp_path):
    image, label = _write_case(tmp_path, "c", shape=(9, 8, 4))
    img, lab = read_la_h5(tmp_path / "c" / H5_NAME)
    assert img.dtype == np.float32 and lab.dtype == np.uint8
    np.testing.assert_array_equal(img, image)
    np.testing.assert_array_equal(lab, label)


def test_read_la_h5_without_label(tmp_path):
    p = tmp_path / "x.h5"
    with h5py.File(p, "w") as f:
        f["image"] = np.zeros((4, 4, 4), np.float32)
    img, lab = read_la_h5(p)
    assert lab is None and img.shape == (4, 4, 4)
    with pytest.raises(ValueError, match="no dataset 'label'"):
        read_la_h5(p, require_label=True)


def _bad_h5(path, kind):
    if kind == "missing":
        return FileNotFoundError, "not found"
    if kind == "not_hdf5":
        path.write_bytes(b"definitely not hdf5" * 50)
        return ValueError, "not a readable HDF5 file"
    with h5py.File(path, "w") as f:
        if kind == "truncated":
            f["image"] = np.zeros((32, 32, 32), np.float32)
        elif kind == "no_image":
            f["img"] = np.zeros((4, 4, 4), np.float32)
        elif kind == "image_2d":
            f["image"] = np.zeros((4, 4), np.float32)
        elif kind == "label_2d":
            f["image"], f["label"] = np.zeros((4, 4, 4), np.float32), np.zeros((4, 4), np.uint8)
        elif kind == "shape_mismatch":
            f["image"], f["label"] = np.zeros((4, 4, 4), np.float32), np.zeros((4, 4, 5), np.uint8)
    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
        return ValueError, "corrupt or truncated"
    return ValueError, {
        "no_image": "no dataset 'image'",
        "image_2d": "'image' is not 3D",
        "label_2d": "'label' is not 3D",
        "shape_mismatch": "differs from 'image'",
    }[kind]


@pytest.mark.parametrize(
    "kind", ["missing", "not_hdf5", "truncated", "no_image", "image_2d", "label_2d", "shape_mismatch"]
)
def test_read_la_h5_errors_name_file_and_problem(tmp_path, kind):
    path = tmp_path / "bad.h5"
    error, fragment = _bad_h5(path, kind)
    with pytest.raises(error, match=fragment) as exc:
        read_la_h5(path)
    assert str(path) in str(exc.value)


def test_read_case_list_normalises_entries(tmp_path):
    p = tmp_path / "l.list"
    p.write_text("A\n  B  \n\nC/mri_norm2.h5\nsub/D.h5\n")
    assert read_case_list(p) == ["A", "B", "C", "D"]


@pytest.mark.parametrize(
    "num_labelled, num_unlabelled, num_validation, expected_unl",
    [(2, None, 3, 5), (2, 4, 3, 4), (3, None, 0, 7), (0, None, 10, 0)],
)
def test_convert_split_and_files(la_root, tmp_path, num_labelled, num_unlabelled, num_validation, expected_unl):
    out = tmp_path / "out"
    dl = convert_la_h5(
        la_root, out, num_labelled=num_labelled, num_unlabelled=num_unlabelled, num_validation=num_validation,
        spacing=(1.25, 1.25, 1.25),
    )  # fmt: skip
    assert dl == str(out / "datalist.json")
    keys = ("training", "unlabeled", "validation", "test")
    names = {k: [_case(i["image"]) for i in load_datalist(dl, k)] for k in keys}
    cases = [f"CASE{i:02d}" for i in range(10)]
    assert names["training"] == cases[:num_labelled]  # first of train.list, in order
    assert names["validation"] == cases[10 - num_validation :]  # end of train.list
    assert names["unlabeled"] == cases[num_labelled : num_labelled + expected_unl]
    assert not set(names["unlabeled"]) & (set(names["training"]) | set(names["validation"]))
    assert names["test"] == ["TEST0", "TEST1"]
    # unlabelled entries name no label; all paths in the JSON are relative
    raw = json.loads(open(dl).read())
    assert all(set(e) == {"image"} for e in raw["unlabeled"])
    assert all(not os.path.isabs(v) for k in raw for e in raw[k] for v in e.values())
    validate_datalist(load_datalist(dl, "training") + load_datalist(dl, "validation"))


def test_convert_keeps_axes_and_writes_spacing(la_root, tmp_path):
    dl = convert_la_h5(la_root, tmp_path / "out", num_labelled=2, spacing=(0.625, 0.625, 0.625))
    item = load_datalist(dl, "training")[1]
    image, label = read_la_h5(la_root / "CASE01" / H5_NAME)
    nii = nib.load(item["image"])
    np.testing.assert_allclose(nii.affine, np.diag([0.625, 0.625, 0.625, 1.0]))
    assert nii.get_data_dtype() == np.float32 and nib.load(item["label"]).get_data_dtype() == np.uint8
    # what MONAI loads is exactly the h5 array, same (x, y, z) axis order, for the NIfTI reader ...
    loaded = LoadImage(image_only=True)(item["image"])
    np.testing.assert_array_equal(np.asarray(loaded), image)
    np.testing.assert_allclose(loaded.pixdim[:3].numpy(), [0.625] * 3)
    np.testing.assert_array_equal(np.asarray(LoadImage(image_only=True)(item["label"])), label)
    # ... and for ITK
    itk_loaded = LoadImage(image_only=True, reader="ITKReader")(item["image"])
    np.testing.assert_array_equal(np.asarray(itk_loaded), image)


def test_convert_scalar_spacing_and_reconvert_on_spacing_change(la_root, tmp_path):
    out = tmp_path / "out"
    dl = convert_la_h5(la_root, out, num_labelled=1, spacing=1.25)
    item = load_datalist(dl, "training")[0]
    assert nib.load(item["image"]).header.get_zooms() == (1.25, 1.25, 1.25)
    convert_la_h5(la_root, out, num_labelled=1, spacing=(0.5, 0.5, 1.0))  # stale spacing is rewritten
    assert nib.load(item["image"]).header.get_zooms() == (0.5, 0.5, 1.0)
    assert nib.load(item["label"]).header.get_zooms() == (0.5, 0.5, 1.0)
    with pytest.raises(ValueError, match="spacing"):
        convert_la_h5(la_root, out, spacing=(1.0, -1.0, 1.0))


def test_convert_without_test_list_and_reuse(la_root, tmp_path):
    os.remove(la_root / "test.list")
    out = tmp_path / "out"
    dl = convert_la_h5(la_root, out, num_labelled=2, num_validation=2)
    assert "test" not in json.loads(open(dl).read())
    first = out / "imagesTr" / "CASE00.nii.gz"
    mtime = os.stat(first).st_mtime_ns
    convert_la_h5(la_root, out, num_labelled=4, num_validation=2)  # existing files reused
    assert os.stat(first).st_mtime_ns == mtime
    assert len(load_datalist(dl, "training")) == 4


@pytest.mark.parametrize("kwargs", [{"num_labelled": 8, "num_validation": 3}, {"num_labelled": 2, "num_unlabelled": 9}])
def test_convert_bad_counts(la_root, tmp_path, kwargs):
    with pytest.raises(ValueError, match="num_"):
        convert_la_h5(la_root, tmp_path / "o", **kwargs)


def test_convert_missing_inputs(tmp_path, la_root):
    with pytest.raises(FileNotFoundError):
        convert_la_h5(tmp_path / "nope", tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="case list not found"):
        convert_la_h5(la_root, tmp_path / "o", train_list="missing.list")


@pytest.mark.parametrize("source_kind", ["h5_root", "datalist", "items"])
def test_kfold_datalists_all_sources_agree(la_root, tmp_path, source_kind):
    out = tmp_path / "folds"
    dl = convert_la_h5(la_root, out, num_labelled=2, num_validation=0)
    if source_kind == "h5_root":
        source = la_root
    elif source_kind == "datalist":
        source = dl
    else:
        source = [
            {"image": str(out / "imagesTr" / f"{c}.nii.gz"), "label": str(out / "labelsTr" / f"{c}.nii.gz")}
            for c in (f"CASE{i:02d}" for i in range(10))
        ]
    paths = kfold_datalists(source, out, num_folds=5, num_labelled=3)
    assert [os.path.basename(p) for p in paths] == [f"datalist_fold{k}.json" for k in range(5)]
    seen_val = []
    for k, p in enumerate(paths):
        val = [_case(i["image"]) for i in load_datalist(p, "validation")]
        tr = [_case(i["image"]) for i in load_datalist(p, "training")]
        unl = load_datalist(p, "unlabeled")
        assert val == [f"CASE{i:02d}" for i in range(2 * k, 2 * k + 2)]
        assert len(tr) == 3 and len(unl) == 5 and not set(tr) & set(val)
        assert all("label" not in u for u in unl)
        seen_val += val
    assert sorted(seen_val) == [f"CASE{i:02d}" for i in range(10)]


def test_kfold_datalists_needs_labels(tmp_path):
    img = tmp_path / "imagesTr" / "a.nii.gz"
    os.makedirs(img.parent)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(img))
    dl = tmp_path / "dl.json"
    dl.write_text(json.dumps({"training": [], "unlabeled": [{"image": "imagesTr/a.nii.gz"}]}))
    with pytest.raises(ValueError, match="needs a label for every case"):
        kfold_datalists(str(dl), num_folds=2, num_labelled=0)
