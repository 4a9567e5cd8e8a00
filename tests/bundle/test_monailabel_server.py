"""The bundle served by a real MONAI Label server (``monailabel start_server``, ``monaibundle`` app), over HTTP.

What a user does (bundle/docs/README.md, "Serving the bundle with MONAI Label"), in a temporary folder: the
``monaibundle`` sample app copied from the installed ``monailabel`` package (``monailabel apps --download``,
offline), this repository's bundle copied under ``<app>/model/<name>`` with freshly initialised ``network_def``
weights in ``models/model.pt``, and a studies folder of small synthetic volumes. Then: wait for ``/info/``; check
the model and its labels are listed; ``POST /infer/<model>`` and check the label volume (shape, affine, label
values); save annotations with ``PUT /datastore/label``; run one-epoch ``/train/<model>`` tasks, the first with
an unlabelled study and a validation split, the second with every study labelled and no validation split (what
an annotator with a few labels gets), and check each finishes and rewrites ``models/model.pt`` with exactly
``network_def``'s keys; infer again with the retrained weights.

Only the *copy* of train.yaml is shrunk (:data:`monailabel_harness.TINY_TRAIN`), so that one epoch takes seconds
on a CPU. Skipped where ``monailabel`` is not installed (``.ci/label.sh`` runs it).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monailabel_harness import (
    AFFINE,
    HAS_MONAILABEL,
    INFER_TIMEOUT,
    MODEL,
    SHAPE,
    START_TIMEOUT,
    TRAIN_TIMEOUT,
    Server,
    copy_bundle,
    expected_labels,
    monailabel_cli,
    needs_monailabel,
    save_label,
    server_env,
    shrink_train_config,
    tiny_weights,
    write_studies,
)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    if not HAS_MONAILABEL:
        pytest.skip("monailabel is not installed")
    root = tmp_path_factory.mktemp("monailabel")
    # 1. the sample app, from the installed package (no network)
    proc = subprocess.run(
        monailabel_cli() + ["apps", "--download", "--name", "monaibundle", "--output", str(root / "apps")],
        env=server_env(), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    app = root / "apps" / "monaibundle"
    assert proc.returncode == 0 and (app / "main.py").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    # 2. the bundle, as a local bundle of that app, with tiny (freshly initialised) weights
    bundle = copy_bundle(app / "model" / MODEL)
    keys = tiny_weights(bundle)
    shrink_train_config(bundle)
    # 3. studies: three synthetic volumes, no labels yet
    studies = root / "studies"
    labels = write_studies(studies, num=3)
    server = Server(app, studies, root / "server.log")
    try:
        info = server.wait_ready(START_TIMEOUT)
        yield {"server": server, "info": info, "bundle": bundle, "keys": keys, "labels": labels, "root": root}
    finally:
        server.stop()


def _infer(served: dict, image_id: str, out: Path) -> tuple[np.ndarray, np.ndarray, float]:
    import requests

    server = served["server"]
    start = time.perf_counter()
    r = requests.post(
        f"{server.url}/infer/{MODEL}", params={"image": image_id, "output": "image"}, timeout=INFER_TIMEOUT
    )
    latency = time.perf_counter() - start
    assert r.status_code == 200, f"{r.status_code} {r.text[:2000]}\n{server.log_tail()}"
    out.write_bytes(r.content)
    mask = nib.load(str(out))
    return np.asarray(mask.dataobj), mask.affine, latency


def _train(served: dict, val_split: float) -> str:
    """One epoch of /train/<model>, waited for; returns its final details."""
    import requests

    server, bundle = served["server"], served["bundle"]
    model_pt = bundle / "models" / "model.pt"
    before = model_pt.stat().st_mtime_ns
    params = {"max_epochs": 1, "val_split": val_split, "device": "cpu", "pretrained": True, "multi_gpu": False}
    start = time.perf_counter()
    r = requests.post(f"{server.url}/train/{MODEL}", json=params, timeout=60)
    assert r.status_code == 200, r.text
    task_id = r.json()["id"]
    deadline = time.monotonic() + TRAIN_TIMEOUT
    while True:
        tasks = requests.get(f"{server.url}/train/", params={"all": "true"}, timeout=30).json()
        task = next(t for t in tasks if t.get("id") == task_id)
        if task["status"] not in ("SUBMITTED", "RUNNING"):
            break
        if time.monotonic() > deadline:
            requests.delete(f"{server.url}/train/", timeout=60)
            pytest.fail(f"training did not finish in {TRAIN_TIMEOUT:.0f} s:\n{server.log_tail()}")
        time.sleep(3.0)
    print(f"\nMONAI Label /train/{MODEL} (1 epoch, val_split {val_split}): {time.perf_counter() - start:.1f} s")
    details = "\n".join(task.get("details", []))
    assert task["status"] == "DONE", f"{task['status']}\n{details}\n{server.log_tail()}"
    # the run wrote models/model.pt, holding exactly the deployed network_def's weights
    assert model_pt.stat().st_mtime_ns != before, f"training did not rewrite {model_pt}\n{details}"
    state = torch.load(model_pt, map_location="cpu", weights_only=True)
    assert set(state.get("model", state)) == served["keys"]
    return details


@needs_monailabel
@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_info_lists_model_labels_and_trainer(served: dict) -> None:
    info = served["info"]
    labels = expected_labels(served["bundle"])
    assert MODEL in info["models"], info["models"].keys()
    model = info["models"][MODEL]
    assert model["type"] == "segmentation" and model["dimension"] == 3
    assert model["labels"] == labels
    assert set(labels) <= set(info["labels"])
    assert MODEL in info["trainers"]
    assert info["datastore"]["total"] == 3


@needs_monailabel
@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_infer_returns_label_volume_with_image_geometry(served: dict, tmp_path: Path) -> None:
    mask, affine, latency = _infer(served, "case0", tmp_path / "case0_pred.nii.gz")
    print(f"\nMONAI Label /infer/{MODEL} on a {SHAPE} volume, first call (loads the model): {latency:.2f} s")
    assert mask.shape == SHAPE
    np.testing.assert_allclose(affine, AFFINE, atol=1e-4)
    assert set(np.unique(mask).tolist()) <= {0, *expected_labels(served["bundle"]).values()}
    _, _, latency = _infer(served, "case1", tmp_path / "case1_pred.nii.gz")
    print(f"MONAI Label /infer/{MODEL} on a {SHAPE} volume, model loaded: {latency:.2f} s")


@needs_monailabel
@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_train_on_saved_labels_then_infer_with_new_weights(served: dict, tmp_path: Path) -> None:
    import requests

    server = served["server"]
    # annotators save final labels for two of the three studies; the third stays unlabelled
    for image_id in ("case0", "case1"):
        save_label(served, image_id, tmp_path)
    stats = requests.get(f"{server.url}/datastore/", params={"output": "stats"}, timeout=30).json()
    assert stats["completed"] == 2, stats
    _train(served, val_split=0.5)  # one labelled study to train on, one to validate, one unlabelled
    # every study labelled, no validation split: no unlabelled image and no validation set
    save_label(served, "case2", tmp_path)
    _train(served, val_split=0.0)
    # the server picks the new file up (it reloads on a changed mtime) and still returns valid labels
    mask, _, _ = _infer(served, "case2", tmp_path / "case2_pred.nii.gz")
    assert mask.shape == SHAPE
    assert set(np.unique(mask).tolist()) <= {0, *expected_labels(served["bundle"]).values()}
