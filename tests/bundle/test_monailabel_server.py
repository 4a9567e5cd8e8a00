"""The bundle served by a real MONAI Label server (``monailabel start_server``, ``monaibundle`` app), over HTTP.

What a user does (bundle/docs/README.md, "Serving the bundle with MONAI Label"), in a temporary folder: the
``monaibundle`` sample app copied from the installed ``monailabel`` package (``monailabel apps --download``, offline), this repository's bundle copied
under ``<app>/model/<name>`` with freshly initialised ``network_def`` weights in ``models/model.pt``, and a
studies folder of small synthetic volumes. Then: wait for ``/info/``; check the model and its labels are
listed; ``POST /infer/<model>`` and check the label volume (shape, affine, label values); save annotations
with ``PUT /datastore/label``; run one-epoch ``/train/<model>`` tasks, the first with an unlabelled study and
a validation split, the second with every study labelled and no validation split (what an annotator with a
few labels gets), and check each finishes and rewrites ``models/model.pt`` with exactly ``network_def``'s
keys; infer again with the retrained weights.

Active learning: the repository's own app (``monailabel_app/``) serves the same bundle with a crafted deployed
model (a 1x1x1 convolution whose foreground probability is a sigmoid of the normalised intensity, so its
uncertainty grows with image noise) over four studies from clean to noisy; ``/activelearning/uncertainty`` must
offer the noisiest unlabelled study, with the score that the bundle's own ``run inference --save_uncertainty
True`` maps give, and after each is labelled the next noisiest.

MONAI Label needs torchvision, which the project's own environment does not have (see bundle/docs/README.md,
"Serving the bundle with MONAI Label"): the server tests are skipped where ``monailabel`` is not installed, and ``.ci/label.sh`` runs them in their
own environment with ``MULTICURE_REQUIRE_MONAILABEL=1``, which turns that skip into a failure. The
``test_config_*`` tests need only MONAI: they rebuild train.yaml the way MONAI Label's ``BundleTrainTask``
does (same override keys) and check what MONAI Label silently gets wrong otherwise (it loads checkpoints
with ``strict=False``).

Only the *copy* of train.yaml is shrunk (patch size, iterations per epoch, batch sizes), so that one epoch
takes seconds on a CPU; MONAI Label itself can only set ``train#trainer#max_epochs``.
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

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundle"
MODEL = "multicure_segmentation"  # the bundle's folder name under <app>/model/ is the model's name in MONAI Label
SHAPE = (40, 36, 28)  # not a multiple of the network's stride nor of the sliding window: padding must be undone
AFFINE = np.array([[1.2, 0, 0, -20.0], [0, 1.0, 0, 5.0], [0, 0, 1.5, 3.0], [0, 0, 0, 1]])
# train.yaml values the temporary copy overrides so that one epoch is a few iterations on small patches
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


def _write_studies(
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


def _copy_bundle(dest: Path) -> Path:
    shutil.copytree(
        BUNDLE,
        dest,
        ignore=shutil.ignore_patterns("*.pt", "*.ts", "data", "eval", "ckpt", "runs", "logs", "output", "__pycache__"),
    )
    return dest


def _tiny_weights(bundle: Path) -> set[str]:
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


def _shrink_train_config(bundle: Path) -> None:
    path = bundle / "configs" / "train.yaml"
    config = ConfigParser.load_config_file(str(path))
    missing = [k for k in TINY_TRAIN if k not in config]
    assert not missing, f"train.yaml has no {missing}: update TINY_TRAIN in this test"
    config.update(TINY_TRAIN)
    ConfigParser.export_config_file(config, str(path), fmt="yaml")


def _expected_labels(bundle: Path) -> dict[str, int]:
    with open(bundle / "configs" / "metadata.json") as f:
        channel_def = json.load(f)["network_data_format"]["outputs"]["pred"]["channel_def"]
    return {v.lower(): int(k) for k, v in channel_def.items() if v.lower() != "background"}


# ---------------------------------------------------------------------------------------------------------
# train.yaml as MONAI Label's BundleTrainTask runs it (monailabel/tasks/train/bundle.py, 0.8.5); no server


def _datastore_datalist(studies: Path, labelled: list[str]) -> list[dict]:
    """What MONAI Label's LocalDatastore.datalist() gives: real paths, labels in <studies>/labels/final."""
    final = studies / "labels" / "final"
    final.mkdir(parents=True, exist_ok=True)
    items = []
    for image_id in labelled:
        label = final / f"{image_id}.nii.gz"
        shutil.copyfile(studies / f"{image_id}.nii.gz", label)  # content does not matter here
        items.append({"image": os.path.realpath(studies / f"{image_id}.nii.gz"), "label": os.path.realpath(label)})
    return items


def _check_train_handlers(handlers: object) -> None:
    assert isinstance(handlers, list), "train#handlers must be a YAML list: MONAI Label inserts a CheckpointLoader"
    refs = [h for h in handlers if not isinstance(h, dict)]
    assert not refs, (
        f"train#handlers items must be inline dicts, not {refs}: MONAI Label calls item.get('_target_') on each"
    )


def _bundle_train_task_parser(bundle: Path, train_ds: list[dict], val_ds: list[dict]) -> ConfigParser:
    """The parser ``monai.bundle.run`` builds from BundleTrainTask's overrides (pretrained=True, CPU)."""
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.yaml"))
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    handlers = parser.get("train#handlers", [])
    _check_train_handlers(handlers)
    # BundleTrainTask._load_checkpoint
    if not [t for t in handlers if t.get("_target_") == "CheckpointLoader"]:
        loader = {
            "_target_": "CheckpointLoader",
            "load_path": str(bundle / "models" / "model.pt"),
            "load_dict": {"model": "$@network"},
            "strict": False,
        }
        handlers.insert(0, loader)
    parser.update(
        {
            "bundle_root": str(bundle),
            "train#trainer#max_epochs": 1,
            "train#dataset#data": train_ds,
            "device": "cpu",  # a string, as MONAI Label passes it
            "train#handlers": handlers,
            "validate#dataset#data": val_ds,
        }
    )
    return parser


def test_config_has_the_ids_monailabel_reads() -> None:
    inference = ConfigParser.load_config_file(str(BUNDLE / "configs" / "inference.yaml"))
    for key in ("network_def", "preprocessing", "postprocessing", "inferer", "device"):
        assert key in inference, f"inference.yaml: no `{key}`"
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.yaml"))
    for key in ("network", "run", "train#trainer#max_epochs", "train#dataset#data", "validate#dataset#data"):
        assert key in parser, f"train.yaml: no `{key}` (BundleTrainTask overrides or runs it)"
    _check_train_handlers(parser.get("train#handlers"))
    with open(BUNDLE / "configs" / "metadata.json") as f:
        data_format = json.load(f)["network_data_format"]
    assert next(iter(data_format["inputs"])) == "image" and next(iter(data_format["outputs"])) == "pred"
    assert _expected_labels(BUNDLE), "metadata.json: outputs#pred#channel_def names no foreground label"


def test_config_pretrained_checkpoint_fills_the_network_monailabel_loads(tmp_path: Path) -> None:
    """MONAI Label fine-tunes from models/model.pt with ``CheckpointLoader(load_dict={"model": "$@network"},
    strict=False)``: state-dict keys that differ are skipped without a word, and training would start from
    scratch and overwrite the deployed model. So train.yaml's ``network`` must have exactly the keys of
    ``network_def`` (what model.pt holds)."""
    bundle = _copy_bundle(tmp_path / "bundle")
    keys = _tiny_weights(bundle)
    studies = tmp_path / "studies"
    _write_studies(studies, num=1)
    parser = _bundle_train_task_parser(bundle, _datastore_datalist(studies, ["case0"]), [])
    network = parser.get_parsed_content("network")
    assert set(network.state_dict()) == keys, (
        "train.yaml `network` (what MONAI Label's CheckpointLoader fills) does not have network_def's keys: "
        f"{len(set(network.state_dict()) & keys)} of {len(keys)} model.pt tensors would load"
    )
    state = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    network.load_state_dict(state.get("model", state), strict=True)


@pytest.mark.parametrize("labelled, unlabelled", [(["case0", "case1"], ["case2"]), (["case0", "case1", "case2"], [])])
def test_config_unlabelled_stream_is_the_studies_unlabelled_images(
    tmp_path: Path, labelled: list[str], unlabelled: list[str]
) -> None:
    """Under MONAI Label only ``train#dataset#data`` (the studies' labelled images) reaches the bundle; the
    semi-supervised stream is then the studies folder's images that have no final label (possibly none)."""
    bundle = _copy_bundle(tmp_path / "bundle")
    _tiny_weights(bundle)
    studies = tmp_path / "studies"
    _write_studies(studies, num=3)
    parser = _bundle_train_task_parser(bundle, _datastore_datalist(studies, labelled), [])
    data = parser.get_parsed_content("train#unlabeled_dataset#data")
    assert [os.path.realpath(d["image"]) for d in data] == [
        os.path.realpath(studies / f"{i}.nii.gz") for i in unlabelled
    ]


# ---------------------------------------------------------------------------------------------------------
# the real server


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _monailabel_cli() -> list[str]:
    """The ``monailabel`` command of the running interpreter's environment (a bash script calling python)."""
    script = Path(sys.executable).parent / "monailabel"
    if script.is_file():
        return ["bash", str(script)]
    return [sys.executable, "-m", "monailabel.main"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["MONAILABEL_PYEXE"] = sys.executable  # the monailabel script runs `python` from PATH otherwise
    # monailabel's train launcher reads PYTHONPATH unconditionally (KeyError when unset)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


class Server:
    """``monailabel start_server`` in its own process group; :meth:`stop` kills the group (trainers included)."""

    def __init__(self, app: Path, studies: Path, log: Path, conf: tuple[str, ...] = ()) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = _monailabel_cli() + [
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
            cmd, cwd=app.parent, env=_env(), stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True
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


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    if not HAS_MONAILABEL:
        pytest.skip("monailabel is not installed")
    root = tmp_path_factory.mktemp("monailabel")
    # 1. the sample app, from the installed package (no network)
    proc = subprocess.run(
        _monailabel_cli() + ["apps", "--download", "--name", "monaibundle", "--output", str(root / "apps")],
        env=_env(), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    app = root / "apps" / "monaibundle"
    assert proc.returncode == 0 and (app / "main.py").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    # 2. the bundle, as a local bundle of that app, with tiny (freshly initialised) weights
    bundle = _copy_bundle(app / "model" / MODEL)
    keys = _tiny_weights(bundle)
    _shrink_train_config(bundle)
    # 3. studies: three synthetic volumes, no labels yet
    studies = root / "studies"
    labels = _write_studies(studies, num=3)
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


def _save_label(served: dict, image_id: str, tmp_path: Path) -> None:
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
    labels = _expected_labels(served["bundle"])
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
    assert set(np.unique(mask).tolist()) <= {0, *_expected_labels(served["bundle"]).values()}
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
        _save_label(served, image_id, tmp_path)
    stats = requests.get(f"{server.url}/datastore/", params={"output": "stats"}, timeout=30).json()
    assert stats["completed"] == 2, stats
    _train(served, val_split=0.5)  # one labelled study to train on, one to validate, one unlabelled
    # every study labelled, no validation split: no unlabelled image and no validation set
    _save_label(served, "case2", tmp_path)
    _train(served, val_split=0.0)
    # the server picks the new file up (it reloads on a changed mtime) and still returns valid labels
    mask, _, _ = _infer(served, "case2", tmp_path / "case2_pred.nii.gz")
    assert mask.shape == SHAPE
    assert set(np.unique(mask).tolist()) <= {0, *_expected_labels(served["bundle"]).values()}


# ---------------------------------------------------------------------------------------------------------
# uncertainty-driven active learning: the repository's own app (monailabel_app/), the same bundle

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
    bundle = _copy_bundle(app / "model" / MODEL)
    _crafted_model(bundle)
    studies = root / "studies"
    labels = _write_studies(studies, num=len(AL_NOISE), seed=11, noise=AL_NOISE)
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
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=INFER_TIMEOUT, check=False)
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
        _save_label(served_app, ranked[0], tmp_path)
        labelled.add(ranked[0])
    print(f"\nuncertainty scores (entropy, structure region): {expected}")
