"""Shared pieces of the MONAI Label tests: synthetic studies, a copy of the bundle, a ``monailabel`` server process.

Used by test_monailabel_config.py (train.yaml as MONAI Label's ``BundleTrainTask`` runs it),
test_monailabel_server.py (the ``monaibundle`` sample app over HTTP) and test_monailabel_active_learning.py
(the repository's own app). MONAI Label needs torchvision, which the project's own environment does not have
(see bundle/docs/README.md, "Serving the bundle with MONAI Label"): the server tests are skipped where
``monailabel`` is not installed, and ``.ci/label.sh`` runs them in their own environment with
``MULTICURE_REQUIRE_MONAILABEL=1``, which turns that skip into a failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

__all__ = [
    "AFFINE", "BUNDLE", "HAS_MONAILABEL", "INFER_TIMEOUT", "MODEL", "REPO", "SHAPE", "START_TIMEOUT",
    "TINY_TRAIN", "TRAIN_TIMEOUT", "Server", "copy_bundle", "expected_labels", "free_port", "monailabel_cli",
    "needs_monailabel", "save_label", "server_env", "shrink_train_config", "tiny_weights", "write_studies",
]  # fmt: skip

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundle"
MODEL = "multicure_segmentation"  # the bundle's folder name under <app>/model/ is the model's name in MONAI Label
SHAPE = (40, 36, 28)  # not a multiple of the network's stride nor of the sliding window: padding must be undone
AFFINE = np.array([[1.2, 0, 0, -20.0], [0, 1.0, 0, 5.0], [0, 0, 1.5, 3.0], [0, 0, 0, 1]])
# train.yaml values the temporary copy overrides so that one epoch is a few iterations on small patches (MONAI
# Label itself can only set train#trainer#max_epochs)
TINY_TRAIN = {
    "val_interval": 2,  # iterations per epoch (MONAI Label sets the number of epochs)
    "roi_size": [32, 32, 32],
    "sw_stride": [16, 16, 16],
    "sw_batch_size": 2,
    "labeled_batch_size": 1,
    "unlabeled_batch_size": 1,
    "num_workers": 0,
}
START_TIMEOUT = 300.0
INFER_TIMEOUT = 600.0
TRAIN_TIMEOUT = 1500.0
HAS_MONAILABEL = importlib.util.find_spec("monailabel") is not None
if not HAS_MONAILABEL and os.environ.get("MULTICURE_REQUIRE_MONAILABEL") == "1":
    raise ImportError("MULTICURE_REQUIRE_MONAILABEL=1 but monailabel is not installed in " + sys.executable)
needs_monailabel = pytest.mark.skipif(
    not HAS_MONAILABEL,
    reason="monailabel is not installed in this environment; .ci/label.sh runs this test in its own venv "
    "(pip install -e .[label], see bundle/docs/README.md, 'Serving the bundle with MONAI Label')",
)


def _phantom(rng: np.random.Generator, noise: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """A bright ellipsoid in Gaussian noise of std ``noise``: ``(H, W, D)`` float32 image and its uint8 label."""
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    radii = rng.uniform(0.35, 0.55, size=3)
    centre = rng.uniform(-0.15, 0.15, size=3)
    inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0
    image = (rng.normal(0.0, noise, SHAPE) + 1.5 * inside).astype(np.float32)
    return image, inside.astype(np.uint8)


def write_studies(
    studies: Path, num: int = 3, seed: int = 7, noise: tuple[float, ...] = ()
) -> dict[str, np.ndarray]:
    """``num`` synthetic volumes ``case<i>.nii.gz`` in ``studies`` (noise std ``noise[i]``, default 0.3); returns
    their labels by image id."""
    studies.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = {}
    for i in range(num):
        image, label = _phantom(rng, noise[i] if noise else 0.3)
        nib.save(nib.Nifti1Image(image, AFFINE), str(studies / f"case{i}.nii.gz"))
        labels[f"case{i}"] = label
    return labels


def copy_bundle(dest: Path) -> Path:
    """The repository's bundle copied to ``dest`` without weights, data and outputs."""
    shutil.copytree(
        BUNDLE,
        dest,
        ignore=shutil.ignore_patterns("*.pt", "*.ts", "data", "eval", "ckpt", "runs", "logs", "output", "__pycache__"),
    )
    return dest


def tiny_weights(bundle: Path) -> set[str]:
    """Save the freshly initialised ``network_def`` of inference.yaml as models/model.pt.

    A bare state dict, as training's ``CheckpointSaver(save_dict={"model": ...})`` writes it (ignite unwraps a
    one-entry checkpoint); MONAI Label also reads ``{"model": state_dict}``.
    """
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.yaml"))
    parser["bundle_root"] = str(bundle)
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    (bundle / "models").mkdir(exist_ok=True)
    torch.save(network.state_dict(), bundle / "models" / "model.pt")
    return set(network.state_dict())


def shrink_train_config(bundle: Path) -> None:
    """The copy's train.yaml with the :data:`TINY_TRAIN` values."""
    path = bundle / "configs" / "train.yaml"
    config = ConfigParser.load_config_file(str(path))
    missing = [k for k in TINY_TRAIN if k not in config]
    assert not missing, f"train.yaml has no {missing}: update TINY_TRAIN in this test"
    config.update(TINY_TRAIN)
    ConfigParser.export_config_file(config, str(path), fmt="yaml")


def expected_labels(bundle: Path) -> dict[str, int]:
    """Label name -> value of the foreground classes, from metadata.json."""
    with open(bundle / "configs" / "metadata.json") as f:
        channel_def = json.load(f)["network_data_format"]["outputs"]["pred"]["channel_def"]
    return {v.lower(): int(k) for k, v in channel_def.items() if v.lower() != "background"}


def free_port() -> int:
    """A TCP port free on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def monailabel_cli() -> list[str]:
    """The ``monailabel`` command of the running interpreter's environment (a bash script calling python)."""
    script = Path(sys.executable).parent / "monailabel"
    if script.is_file():
        return ["bash", str(script)]
    return [sys.executable, "-m", "monailabel.main"]


def server_env() -> dict[str, str]:
    """The environment of a ``monailabel`` process: this interpreter first on PATH, the repository on PYTHONPATH."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["MONAILABEL_PYEXE"] = sys.executable  # the monailabel script runs `python` from PATH otherwise
    # monailabel's train launcher reads PYTHONPATH unconditionally (KeyError when unset)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


class Server:
    """``monailabel start_server`` in its own process group; :meth:`stop` kills the group (trainers included)."""

    def __init__(self, app: Path, studies: Path, log: Path, conf: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = monailabel_cli() + [
            "start_server",
            "--app", str(app),
            "--studies", str(studies),
            "--conf", "models", MODEL,
            "--conf", "zoo_source", "github",  # anything but "monaihosting": no zoo listing, local bundle only
            "--conf", "sam2", "false",
            "--conf", "preload", "false",
            *conf,
            "--host", "127.0.0.1",
            "--port", str(self.port),
        ]  # fmt: skip
        self._log_file = open(log, "w")  # noqa: SIM115  (open for the server's lifetime, closed in stop())
        self.proc = subprocess.Popen(
            cmd, cwd=app.parent, env=server_env(), stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True
        )

    def log_tail(self, n: int = 6000) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")[-n:]

    def wait_ready(self, timeout: float) -> dict:
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"monailabel exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                r = requests.get(f"{self.url}/info/", timeout=10)
                if r.status_code == 200:
                    return r.json()
            except requests.RequestException:
                pass
            time.sleep(1.0)
        pytest.fail(f"/info/ not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=30)
            else:  # the server is gone; a trainer child of its group may not be
                os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        finally:
            self._log_file.close()


def save_label(served: dict, image_id: str, tmp_path: Path) -> None:
    """``PUT /datastore/label``: the study's true label as its final label, as an annotator saves it."""
    import requests

    path = tmp_path / f"{image_id}_label.nii.gz"
    nib.save(nib.Nifti1Image(served["labels"][image_id], AFFINE), str(path))
    with open(path, "rb") as f:
        r = requests.put(
            f"{served['server'].url}/datastore/label",
            params={"image": image_id, "tag": "final"},
            files={"label": (path.name, f, "application/octet-stream")},
            timeout=60,
        )
    assert r.status_code == 200, r.text
