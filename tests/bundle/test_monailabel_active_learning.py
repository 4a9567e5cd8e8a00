"""Uncertainty-driven active learning: the repository's own MONAI Label app (``monailabel_app/``) over HTTP.

The app serves the bundle with a crafted deployed model (a 1x1x1 convolution whose foreground probability is a
sigmoid of the normalised intensity, so its uncertainty grows with image noise) over four studies from clean to
noisy; ``/activelearning/uncertainty`` must offer the noisiest unlabelled study, with the score that the
bundle's own ``run inference --save_uncertainty True`` maps give, and after each is labelled the next noisiest.
Skipped where ``monailabel`` is not installed (``.ci/label.sh`` runs it).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monailabel_harness import (
    HAS_MONAILABEL,
    INFER_TIMEOUT,
    MODEL,
    REPO,
    START_TIMEOUT,
    Server,
    copy_bundle,
    needs_monailabel,
    save_label,
    server_env,
    write_studies,
)

APP = REPO / "monailabel_app"
AL_NOISE = (0.2, 0.5, 1.0, 1.6)  # four studies from clean to noisy
SCORE_KEY = "multicure_uncertainty"
# the crafted deployed model: a 1x1x1 convolution, foreground probability sigmoid(3 (x - 1)) of the normalised
# intensity x. Its uncertainty grows with the image noise, so the study it is least sure about is the noisiest.
CRAFTED_NETWORK = {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2, "kernel_size": 1}


def _crafted_model(bundle: Path) -> None:
    path = bundle / "configs" / "inference.yaml"
    config = ConfigParser.load_config_file(str(path))
    config["network_def"] = CRAFTED_NETWORK
    ConfigParser.export_config_file(config, str(path), fmt="yaml")
    state = {"weight": torch.tensor([0.0, 3.0]).view(2, 1, 1, 1, 1), "bias": torch.tensor([0.0, -3.0])}
    (bundle / "models").mkdir(exist_ok=True)
    torch.save(state, bundle / "models" / "model.pt")


@pytest.fixture(scope="module")
def served_app(tmp_path_factory: pytest.TempPathFactory):
    if not HAS_MONAILABEL:
        pytest.skip("monailabel is not installed")
    root = tmp_path_factory.mktemp("monailabel_app")
    app = root / "apps" / "multicure"
    shutil.copytree(APP, app, ignore=shutil.ignore_patterns("__pycache__", "model"))
    bundle = copy_bundle(app / "model" / MODEL)
    _crafted_model(bundle)
    studies = root / "studies"
    labels = write_studies(studies, num=len(AL_NOISE), seed=11, noise=AL_NOISE)
    server = Server(app, studies, root / "server.log", conf=("--conf", "uncertainty_measure", "entropy"))
    try:
        info = server.wait_ready(START_TIMEOUT)
        yield {"server": server, "info": info, "bundle": bundle, "labels": labels, "root": root, "studies": studies}
    finally:
        server.stop()


def _expected_uncertainty(bundle: Path, studies: Path, out: Path, threshold: float = 0.7) -> dict[str, float]:
    """Each study's mean normalised entropy over its structure region, from the bundle's own inference run
    (``run inference --save_uncertainty True``: mask, confidence and entropy maps on disk), not the app's code."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference",
           "--config_file", str(bundle / "configs" / "inference.yaml"), "--bundle_root", str(bundle),
           "--input_dir", str(studies), "--output_dir", str(out), "--save_uncertainty", "True",
           "--device", "cpu"]  # fmt: skip
    proc = subprocess.run(cmd, env=server_env(), capture_output=True, text=True, timeout=INFER_TIMEOUT, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    scores = {}
    for image in sorted(studies.glob("case*.nii.gz")):
        name = image.name[: -len(".nii.gz")]
        seg, conf, ent = (np.asarray(nib.load(str(out / f"{name}_{m}.nii.gz")).dataobj)
                          for m in ("seg", "confidence", "entropy"))  # fmt: skip
        region = (seg > 0) | (conf < threshold)
        scores[name] = float(ent[region].mean()) if region.any() else 0.0
    return scores


def _scoring_sync(server: Server) -> dict:
    """``POST /scoring/uncertainty?run_sync=true``, retried while the start-up scoring still runs (429)."""
    import requests

    deadline = time.monotonic() + INFER_TIMEOUT
    while True:
        r = requests.post(f"{server.url}/scoring/uncertainty", params={"run_sync": "true"}, timeout=INFER_TIMEOUT)
        if r.status_code != 429 or time.monotonic() > deadline:
            break
        time.sleep(2.0)
    assert r.status_code == 200, f"{r.status_code} {r.text[:2000]}\n{server.log_tail()}"
    return r.json()


@needs_monailabel
@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_active_learning_offers_the_study_the_model_is_least_sure_about(served_app: dict, tmp_path: Path) -> None:
    import requests

    server = served_app["server"]
    info = served_app["info"]
    assert "uncertainty" in info["strategies"], info["strategies"]
    assert "uncertainty" in info["scoring"], info["scoring"]
    assert MODEL in info["models"] and MODEL in info["trainers"]
    expected = _expected_uncertainty(served_app["bundle"], served_app["studies"], tmp_path / "inference")
    _scoring_sync(server)
    noisiest_first = [f"case{i}" for i in np.argsort(AL_NOISE)[::-1]]
    assert sorted(expected, key=expected.get, reverse=True) == noisiest_first, expected
    labelled: set[str] = set()
    for _ in range(len(AL_NOISE) - 1):
        remaining = {k: v for k, v in expected.items() if k not in labelled}
        ranked = sorted(remaining, key=remaining.get, reverse=True)
        assert remaining[ranked[0]] - remaining[ranked[1]] > 1e-3 * remaining[ranked[0]], f"a near tie: {expected}"
        r = requests.post(f"{server.url}/activelearning/uncertainty", json={}, timeout=60)
        assert r.status_code == 200, f"{r.status_code} {r.text[:2000]}\n{server.log_tail()}"
        answer = r.json()
        assert answer["id"] == ranked[0], (answer, expected)
        assert answer[SCORE_KEY] == pytest.approx(expected[ranked[0]], rel=1e-3, abs=1e-5), (answer, expected)
        # the annotator labels it; the next answer is the least sure of the studies still unlabelled
        save_label(served_app, ranked[0], tmp_path)
        labelled.add(ranked[0])
    print(f"\nuncertainty scores (entropy, structure region): {expected}")
