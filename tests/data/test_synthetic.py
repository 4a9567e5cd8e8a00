from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from multicure_monai.data.datalist import load_datalist, validate_datalist
from multicure_monai.data.synthetic import (
    STAMP_NAME,
    best_threshold_dice,
    ensure_phantom_dataset,
    generate_phantom_dataset,
    make_phantom,
)

SMALL = (32, 32, 24)


@pytest.mark.parametrize(
    "shape, seed, spacing", [((32, 32, 24), 0, (1.0, 1.0, 1.0)), ((28, 32, 20), 3, (1.0, 1.0, 2.0))]
)
def test_make_phantom_properties(shape, seed, spacing):
    image, label = make_phantom(shape, seed=seed, spacing=spacing)
    assert image.shape == label.shape == shape
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert set(np.unique(label).tolist()) == {0, 1}
    assert 0.05 <= label.mean() <= 0.25
    assert np.isfinite(image).all()
    assert abs(float(image.mean())) < 1e-4 and abs(float(image.std()) - 1.0) < 1e-3  # z-scored
    assert image[label > 0].mean() > image[label == 0].mean() + 1.0  # the organ is bright
    # one organ: the largest connected component holds almost all of the label
    comps, n = ndimage.label(label)
    assert np.bincount(comps.ravel())[1:].max() >= 0.95 * label.sum()


@pytest.mark.parametrize("seed", [0, 1])
def test_make_phantom_deterministic(seed):
    a = make_phantom(SMALL, seed=seed)
    b = make_phantom(SMALL, seed=seed)
    c = make_phantom(SMALL, seed=seed + 10)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_partial_volume_edges():
    """Intensity ramps across the boundary: boundary voxels lie between inside and outside intensities."""
    image, label = make_phantom((48, 48, 40), seed=2)
    inner = ndimage.binary_erosion(label, iterations=2)
    outer = ~ndimage.binary_dilation(label, iterations=2)
    edge_in = label.astype(bool) & ~ndimage.binary_erosion(label)
    edge_out = ~label.astype(bool) & ndimage.binary_dilation(label)
    m_in, m_out = image[inner].mean(), image[outer & ndimage.binary_dilation(label, iterations=4)].mean()
    assert m_out < image[edge_out].mean() < image[edge_in].mean() < m_in


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_global_threshold_is_not_enough(seed):
    image, label = make_phantom((64, 64, 48), seed=seed)
    dice, _ = best_threshold_dice(image, label)
    assert dice < 0.9
    assert dice > 0.6  # but the organ is clearly visible


def test_best_threshold_dice_known_values():
    label = np.zeros((10, 10, 10), np.uint8)
    label[:5] = 1
    dice, t = best_threshold_dice(label.astype(np.float32) * 2.0 - 1.0, label)
    assert dice == pytest.approx(1.0) and -1.0 <= t < 1.0
    noisy = label.astype(np.float32)
    noisy[5:7] = 1.0  # 200 false positives at the foreground intensity: Dice = 2*500 / (700 + 500)
    assert best_threshold_dice(noisy, label)[0] == pytest.approx(1000 / 1200)


def _arrays(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".nii.gz"):
                out[os.path.relpath(os.path.join(dirpath, f), root)] = nib.load(os.path.join(dirpath, f)).get_fdata()
    return out


def test_generate_dataset_layout_and_determinism(tmp_path):
    kw = dict(num_labelled=2, num_unlabelled=3, num_validation=1, shape=SMALL, seed=7, spacing=(1.0, 1.0, 1.5))
    dl = generate_phantom_dataset(tmp_path / "a", **kw)
    assert dl == str(tmp_path / "a" / "datalist.json")
    tr, unl, val = (load_datalist(dl, k) for k in ("training", "unlabeled", "validation"))
    assert (len(tr), len(unl), len(val)) == (2, 3, 1)
    assert all(set(i) == {"image"} for i in unl)
    for i in unl:  # unlabelled cases get no label file
        assert not os.path.exists(i["image"].replace("imagesTr", "labelsTr"))
    validate_datalist(tr + val)
    validate_datalist(unl, label_key=None)
    nii = nib.load(tr[0]["image"])
    np.testing.assert_allclose(nii.affine, np.diag([1.0, 1.0, 1.5, 1.0]))
    assert nii.shape == SMALL and nii.get_data_dtype() == np.float32
    assert nib.load(tr[0]["label"]).get_data_dtype() == np.uint8
    raw = json.loads(open(dl).read())
    assert all(not os.path.isabs(v) for k in raw for e in raw[k] for v in e.values())
    # deterministic: a second generation elsewhere gives the same arrays and the same bytes
    dl2 = generate_phantom_dataset(tmp_path / "b", **kw)
    a, b = _arrays(tmp_path / "a"), _arrays(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) == 2 + 3 + 1 + 2 + 1
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        assert open(tmp_path / "a" / k, "rb").read() == open(tmp_path / "b" / k, "rb").read()
    assert open(dl).read() == open(dl2).read()


def test_generate_refuses_to_clobber_other_parameters(tmp_path):
    generate_phantom_dataset(tmp_path, num_labelled=1, num_unlabelled=1, num_validation=1, shape=SMALL)
    # same parameters: a no-op returning the datalist
    generate_phantom_dataset(tmp_path, num_labelled=1, num_unlabelled=1, num_validation=1, shape=SMALL)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        generate_phantom_dataset(tmp_path, num_labelled=2, num_unlabelled=1, num_validation=1, shape=SMALL)
    dl = generate_phantom_dataset(
        tmp_path, num_labelled=2, num_unlabelled=1, num_validation=1, shape=SMALL, overwrite=True
    )
    assert len(load_datalist(dl, "training")) == 2


def test_ensure_generates_once_and_regenerates_on_change(tmp_path):
    kw = dict(num_labelled=1, num_unlabelled=1, num_validation=1, shape=SMALL)
    dl = ensure_phantom_dataset(tmp_path, **kw)
    stamp = json.loads((tmp_path / STAMP_NAME).read_text())
    assert stamp["num_labelled"] == 1 and stamp["shape"] == list(SMALL)
    img = load_datalist(dl, "training")[0]["image"]
    mtime = os.stat(img).st_mtime_ns
    assert ensure_phantom_dataset(tmp_path, **kw) == dl
    assert os.stat(img).st_mtime_ns == mtime  # nothing rewritten
    # a missing file named by the datalist triggers regeneration
    os.remove(load_datalist(dl, "validation")[0]["label"])
    ensure_phantom_dataset(tmp_path, **kw)
    assert os.path.isfile(load_datalist(dl, "validation")[0]["label"])
    # other parameters regenerate, with the new counts and a new stamp
    ensure_phantom_dataset(tmp_path, **{**kw, "num_unlabelled": 2, "seed": 1})
    assert len(load_datalist(dl, "unlabeled")) == 2
    assert json.loads((tmp_path / STAMP_NAME).read_text())["seed"] == 1


@pytest.mark.parametrize(
    "shape, spacing", [((32, 32), (1.0, 1.0, 1.0)), ((4, 32, 32), (1.0, 1.0, 1.0)), (SMALL, (1.0, 0.0, 1.0))]
)
def test_make_phantom_rejects_bad_arguments(shape, spacing):
    with pytest.raises(ValueError):
        make_phantom(shape, spacing=spacing)
