"""The library's defaults are the bundle's: a component built without an argument behaves as train.yaml's.

For every component train.yaml builds, each argument it sets must either equal the library default or have no
default (a value the caller must choose). Arguments that describe the data or the run rather than the method
(channels, classes, sizes, paths, the objects a component is wired to) are not defaults of the method.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from monai.bundle import ConfigParser
from monai.utils import optional_import

CONFIGS = Path(__file__).resolve().parents[2] / "bundle" / "configs"
COMPONENTS = [
    "predictive_def", "auxiliary_def", "network_def", "loss_terms#pseudo#compute#loss", "loss_terms#reg#compute#loss",
    "loss_terms#contrastive#compute#loss", "loss_terms#pseudo#weight", "loss_terms#contrastive#weight",
    "loss_terms#sup#compute", "loss_terms#pseudo#compute", "loss_terms#reg#compute", "loss_terms#reg",
    "loss_terms#contrastive#compute", "lr_scheduler", "train#trainer", "inferer", "train#ema_network",
]  # fmt: skip
NOT_METHOD = {
    "spatial_dims", "in_channels", "out_channels", "num_classes", "device", "max_epochs", "epoch_length", "optimizer",
    "train_data_loader", "unlabeled_data_loader", "network", "aux_network", "predictive", "auxiliary", "loss",
    "loss_terms", "inferer", "train_handlers", "ema_network", "roi_size", "sw_batch_size", "stride", "max_iterations",
    "amp", "amp_kwargs", "channels_last", "supervised_only", "weight", "nets", "rampup_iterations", "base",
    "empty_unlabeled", "diagnostics_interval", "networks", "step_size", "gamma", "mode", "part", "scale",
}  # fmt: skip


def _target(parser: ConfigParser, cid: str):
    name = parser[cid]["_target_"]
    module, _, attr = name.rpartition(".")
    obj, ok = optional_import(module, name=attr)
    assert ok, name
    return obj


@pytest.mark.parametrize("cid", COMPONENTS)
def test_bundle_values_are_the_library_defaults(cid: str) -> None:
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.yaml"))
    parser.update({"bundle_root": "/nonexistent", "device": "$torch.device('cpu')"})
    params = inspect.signature(_target(parser, cid)).parameters
    differ = {}
    for key in parser[cid]:
        if key.startswith("_") or key in NOT_METHOD or key not in params:
            continue
        default = params[key].default
        if default is inspect.Parameter.empty:
            continue
        value = parser.get_parsed_content(f"{cid}#{key}")
        if isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        if value != default:
            differ[key] = (value, default)
    assert not differ, f"{cid}: bundle value vs library default: {differ}"
