from __future__ import annotations

import json
import os
import re
import warnings

import h5py
import nibabel as nib
import numpy as np
import pytest
from monai.data import load_decathlon_datalist

from multicure_monai.data.datalist import (
    inference_data,
    kfold_datalist,
    kfold_split,
    list_images,
    load_datalist,
    unlabeled_data,
    validate_datalist,
    write_datalist,
)

SHAPE = (8, 9, 7)


def _nii(path, arr) -> str:
    nib.save(nib.Nifti1Image(np.asarray(arr), np.eye(4)), str(path))
    return str(path)


def _good_pair(tmp_path, name="case"):
    rng = np.random.default_rng(0)
    img = rng.standard_normal(SHAPE).astype(np.float32)
    lab = np.zeros(SHAPE, np.uint8)
    lab[2:5, 3:6, 2:4] = 1
    return {"image": _nii(tmp_path / f"{name}_img.nii.gz", img), "label": _nii(tmp_path / f"{name}_lab.nii.gz", lab)}


# ---------------------------------------------------------------------------------------------- load/write


def test_write_then_load_roundtrip_relative_paths(tmp_path):
    pair = _good_pair(tmp_path)
    path = write_datalist(tmp_path / "sub" / "dl.json", {"training": [pair], "unlabeled": [{"image": pair["image"]}]})
    raw = json.loads(open(path).read())
    assert not os.path.isabs(raw["training"][0]["image"])  # stored relative to the JSON folder
    assert raw["training"][0]["image"] == os.path.join("..", "case_img.nii.gz")
    assert load_datalist(path, "training") == [pair]
    assert load_datalist(path, "unlabeled") == [{"image": pair["image"]}]
    # same result with MONAI's own loader
    monai_items = load_decathlon_datalist(path, data_list_key="training", base_dir=os.path.dirname(path))
    assert [dict(i) for i in monai_items] == [pair]


@pytest.mark.parametrize(
    "content, key, error, fragment",
    [
        (None, "training", FileNotFoundError, "not found"),
        ("{not json", "training", ValueError, "not a valid JSON"),
        ('{"training": []}', "validation", ValueError, "no key 'validation'"),
    ],
)
def test_load_datalist_errors(tmp_path, content, key, error, fragment):
    path = tmp_path / "dl.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(error, match=fragment) as exc:
        load_datalist(path, key)
    assert str(path) in str(exc.value)


# ---------------------------------------------------------------------------------------------------- k-fold


@pytest.mark.parametrize("n, k", [(80, 5), (82, 4), (10, 3), (7, 7)])
def test_kfold_split_partitions_contiguously(n, k):
    items = list(range(n))
    vals = []
    for fold in range(k):
        train, val = kfold_split(items, k, fold)
        assert sorted(train + val) == items  # partition of the items
        assert val == list(range(val[0], val[0] + len(val)))  # one contiguous block
        assert train == [i for i in items if i not in val]  # original order kept
        vals += val
        assert kfold_split(items, k, fold) == (train, val)  # deterministic
    assert vals == items  # folds in order cover everything once
    sizes = [len(kfold_split(items, k, f)[1]) for f in range(k)]
    assert max(sizes) - min(sizes) <= 1


def test_kfold_split_mcf_la_blocks():
    _, val0 = kfold_split(list(range(80)), 5, 0)
    _, val4 = kfold_split(list(range(80)), 5, 4)
    assert val0 == list(range(16)) and val4 == list(range(64, 80))


@pytest.mark.parametrize("n, k, fold", [(5, 1, 0), (3, 4, 0), (10, 5, 5), (10, 5, -1)])
def test_kfold_split_bad_args(n, k, fold):
    with pytest.raises(ValueError):
        kfold_split(list(range(n)), k, fold)


@pytest.mark.parametrize("num_unlabelled", [None, 3])
def test_kfold_datalist_roles(num_unlabelled):
    items = [{"image": f"i{i}", "label": f"l{i}"} for i in range(20)]
    dl = kfold_datalist(items, num_folds=4, fold=1, num_labelled=2, num_unlabelled=num_unlabelled)
    assert [d["image"] for d in dl["validation"]] == [f"i{i}" for i in range(5, 10)]
    assert [d["image"] for d in dl["training"]] == ["i0", "i1"]
    expected_unl = [f"i{i}" for i in [2, 3, 4, *range(10, 20)]]
    assert [d["image"] for d in dl["unlabeled"]] == expected_unl[: num_unlabelled or None]
    assert all("label" not in d for d in dl["unlabeled"])
    assert all("label" in d for d in dl["training"] + dl["validation"])


# ------------------------------------------------------------------------------------------------ validation


def test_validate_good_datalist_passes(tmp_path):
    items = [_good_pair(tmp_path, "a"), _good_pair(tmp_path, "b")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_datalist(items)
        validate_datalist([{"image": i["image"]} for i in items], label_key=None)


def test_validate_accepts_channel_first_4d_and_h5(tmp_path):
    img = np.random.default_rng(1).standard_normal((2, *SHAPE)).astype(np.float32)
    lab = np.zeros(SHAPE, np.uint8)
    lab[1:3, 1:3, 1:3] = 1
    nii = _nii(tmp_path / "img4d.nii.gz", np.moveaxis(img, 0, -1))  # NIfTI stores channels last
    validate_datalist([{"image": nii, "label": _nii(tmp_path / "l.nii.gz", lab)}], in_channels=2)
    h5 = tmp_path / "case.h5"
    with h5py.File(h5, "w") as f:
        f["image"], f["label"] = img[0], lab
    validate_datalist([{"image": str(h5), "label": str(h5)}])


def _truncate(path, fraction=0.5):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: int(len(data) * fraction)])


def _bad_case(tmp_path, kind):
    """Write one bad case; return (item, offending file, expected message fragment, validate kwargs)."""
    item = _good_pair(tmp_path, kind)
    kwargs = {}
    if kind == "missing_image":
        os.remove(item["image"])
        return item, item["image"], "image file not found", kwargs
    if kind == "missing_label":
        os.remove(item["label"])
        return item, item["label"], "label file not found", kwargs
    if kind == "truncated_nii":
        _truncate(item["image"])
        return item, item["image"], "cannot be read, corrupt or truncated", kwargs
    if kind == "garbage_nii":
        open(item["label"], "wb").write(b"this is not a nifti file" * 20)
        return item, item["label"], "cannot be read, corrupt or truncated", kwargs
    if kind == "truncated_h5":
        h5 = tmp_path / "t.h5"
        with h5py.File(h5, "w") as f:
            f["image"] = np.zeros((16, 16, 16), np.float32)
            f["label"] = np.zeros((16, 16, 16), np.uint8)
        _truncate(h5, 0.3)
        return {"image": str(h5)}, str(h5), "cannot be read, corrupt or truncated", {"label_key": None}
    if kind == "not_3d":
        _nii(item["image"], np.zeros(SHAPE[:2], np.float32))
        return item, item["image"], "image is not 3D", kwargs
    if kind == "wrong_channels":
        _nii(item["image"], np.zeros((*SHAPE, 3), np.float32))
        return item, item["image"], "3 channels, expected in_channels=1", kwargs
    if kind == "label_out_of_range":
        lab = np.zeros(SHAPE, np.uint8)
        lab[0, 0, 0], lab[1, 1, 1] = 1, 3
        _nii(item["label"], lab)
        return item, item["label"], "label values outside {0..1}", kwargs
    if kind == "label_negative":
        lab = np.zeros(SHAPE, np.int16)
        lab[0, 0, 0] = -1
        _nii(item["label"], lab)
        return item, item["label"], "label values outside", kwargs
    if kind == "label_non_integer":
        lab = np.zeros(SHAPE, np.float32)
        lab[0, 0, 0] = 0.5
        _nii(item["label"], lab)
        return item, item["label"], "non-integer", kwargs
    if kind == "shape_mismatch":
        _nii(item["label"], np.ones((SHAPE[0] + 1, *SHAPE[1:]), np.uint8))
        return item, item["label"], "differs from image", kwargs
    if kind == "nan_image":
        img = np.zeros(SHAPE, np.float32)
        img[1, 1, 1], img[2, 2, 2] = np.nan, np.inf
        _nii(item["image"], img)
        return item, item["image"], r"NaN/Inf values \(1 NaN, 1 Inf\)", kwargs
    if kind == "empty_label_strict":
        _nii(item["label"], np.zeros(SHAPE, np.uint8))
        return item, item["label"], "label is empty", {"allow_empty_labels": False}
    raise AssertionError(kind)


BAD_KINDS = [
    "missing_image",
    "missing_label",
    "truncated_nii",
    "garbage_nii",
    "truncated_h5",
    "not_3d",
    "wrong_channels",
    "label_out_of_range",
    "label_negative",
    "label_non_integer",
    "shape_mismatch",
    "nan_image",
    "empty_label_strict",
]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_validate_reports_bad_case(tmp_path, kind):
    good = _good_pair(tmp_path, "good")
    bad, offender, fragment, kwargs = _bad_case(tmp_path, kind)
    items = [good, bad] if "label_key" not in kwargs else [{"image": good["image"]}, bad]
    expected = FileNotFoundError if kind.startswith("missing") else ValueError
    with pytest.raises(expected) as exc:
        validate_datalist(items, **kwargs)
    msg = str(exc.value)
    # one line names the offending file and says what is wrong with it
    assert any(offender in ln and re.search(fragment, ln) for ln in msg.splitlines()[1:]), msg
    assert good["image"] not in msg and good["label"] not in msg  # the good case is not blamed


def test_validate_collects_all_problems_in_one_error(tmp_path):
    kinds = ["missing_image", "label_out_of_range", "nan_image", "truncated_nii"]
    cases = [_bad_case(tmp_path, k) for k in kinds]
    with pytest.raises(ValueError) as exc:  # mixed problems: ValueError, not FileNotFoundError
        validate_datalist([c[0] for c in cases])
    body = str(exc.value).splitlines()
    assert body[0] == f"datalist check failed with {len(kinds)} problems:"
    for _, offender, _, _ in cases:
        assert sum(offender in ln for ln in body[1:]) == 1


def test_validate_warns_on_empty_label(tmp_path):
    item = _good_pair(tmp_path)
    _nii(item["label"], np.zeros(SHAPE, np.uint8))
    with pytest.warns(UserWarning, match="label is empty") as rec:
        validate_datalist([item])
    assert item["label"] in str(rec[0].message)


def test_validate_num_classes(tmp_path):
    item = _good_pair(tmp_path)
    lab = np.zeros(SHAPE, np.uint8)
    lab[0, 0, 0], lab[1, 1, 1] = 1, 2
    _nii(item["label"], lab)
    validate_datalist([item], num_classes=3)
    with pytest.raises(ValueError, match="outside"):
        validate_datalist([item], num_classes=2)


def test_validate_without_content_only_checks_existence(tmp_path):
    item = _good_pair(tmp_path)
    _truncate(item["image"])
    validate_datalist([item], check_content=False)
    os.remove(item["label"])
    with pytest.raises(FileNotFoundError, match="label file not found"):
        validate_datalist([item], check_content=False)


def test_validate_missing_label_key(tmp_path):
    item = _good_pair(tmp_path)
    with pytest.raises(ValueError, match="has no 'label' key"):
        validate_datalist([{"image": item["image"]}])


def test_load_datalist_missing_ok(tmp_path):
    path = write_datalist(tmp_path / "dl.json", {"training": []})
    assert load_datalist(path, "unlabeled", missing_ok=True) == []
    with pytest.raises(ValueError, match="no key 'unlabeled'"):
        load_datalist(path, "unlabeled")


def test_list_images(tmp_path):
    os.makedirs(tmp_path / "sub")
    for name in ["b.nii.gz", "sub/a.nrrd", "c.mha", "notes.txt", "d.NII"]:
        (tmp_path / name).write_bytes(b"x")
    found = [os.path.relpath(i["image"], tmp_path) for i in list_images(tmp_path)]
    assert found == sorted(["b.nii.gz", "sub/a.nrrd", "c.mha", "d.NII"])
    with pytest.raises(ValueError, match="no image files"):
        list_images(tmp_path / "sub", suffixes=(".nii.gz",))
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "nope")


@pytest.mark.parametrize(
    "lists, studies, expected",
    [
        ({"training": [], "unlabeled": [{"image": "u.nii.gz"}]}, None, ["u.nii.gz"]),
        ({"training": []}, None, []),  # no unlabelled list: training without unlabelled data
        ({"training": [], "unlabeled": [{"image": "u.nii.gz"}]}, [{"image": "s.nii.gz"}], ["s.nii.gz"]),
        (None, [], []),  # an empty studies list wins too; the datalist is not read
    ],
)
def test_unlabeled_data(tmp_path, lists, studies, expected):
    path = None if lists is None else write_datalist(tmp_path / "dl.json", lists)
    result = unlabeled_data(path, "unlabeled", studies)
    assert [os.path.basename(i["image"]) for i in result] == expected
    if studies is not None:
        assert result is studies


@pytest.mark.parametrize("use_folder", [True, False])
@pytest.mark.parametrize("empty_folder", [None, ""])
def test_inference_data(tmp_path, use_folder, empty_folder):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.nii.gz").write_bytes(b"x")
    entry = {"image": str(folder / "a.nii.gz"), "label": "l.nii.gz"}
    path = write_datalist(tmp_path / "dl.json", {"validation": [entry]})
    if use_folder:
        assert inference_data(folder, None, "validation") == [{"image": str(folder / "a.nii.gz")}]
    else:
        assert inference_data(empty_folder, path, "validation") == load_datalist(path, "validation")
