"""train.yaml as MONAI Label's ``BundleTrainTask`` runs it (monailabel/tasks/train/bundle.py, 0.8.5); no server.

These tests need only MONAI: they rebuild train.yaml the way ``BundleTrainTask`` does (same override keys) and
check what MONAI Label silently gets wrong otherwise (it loads checkpoints with ``strict=False``), and that the
ids it reads are there.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monailabel_harness import BUNDLE, copy_bundle, expected_labels, tiny_weights, write_studies


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
    assert expected_labels(BUNDLE), "metadata.json: outputs#pred#channel_def names no foreground label"


def test_config_pretrained_checkpoint_fills_the_network_monailabel_loads(tmp_path: Path) -> None:
    """MONAI Label fine-tunes from models/model.pt with ``CheckpointLoader(load_dict={"model": "$@network"},
    strict=False)``: state-dict keys that differ are skipped without a word, and training would start from
    scratch and overwrite the deployed model. So train.yaml's ``network`` must have exactly the keys of
    ``network_def`` (what model.pt holds)."""
    bundle = copy_bundle(tmp_path / "bundle")
    keys = tiny_weights(bundle)
    studies = tmp_path / "studies"
    write_studies(studies, num=1)
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
    bundle = copy_bundle(tmp_path / "bundle")
    tiny_weights(bundle)
    studies = tmp_path / "studies"
    write_studies(studies, num=3)
    parser = _bundle_train_task_parser(bundle, _datastore_datalist(studies, labelled), [])
    data = parser.get_parsed_content("train#unlabeled_dataset#data")
    assert [os.path.realpath(d["image"]) for d in data] == [
        os.path.realpath(studies / f"{i}.nii.gz") for i in unlabelled
    ]
