"""The loss table and the network protocol through train.yaml: a toy term and a MONAI UNet, config only."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

CONFIGS = Path(__file__).resolve().parents[2] / "bundle" / "configs"
UNET = {
    "_target_": "multicure_monai.networks.protocol.SegmentationNetworkAdapter",
    "network": {"_target_": "monai.networks.nets.UNet", "spatial_dims": 3, "in_channels": "@in_channels",
                "out_channels": "@num_classes", "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1},
}  # fmt: skip

pytestmark = pytest.mark.slow


def _parser(tmp_path: Path, datalist: Path, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.yaml"))
    parser.update({"bundle_root": str(tmp_path), "datalist": str(datalist), "max_iterations": 2, "val_interval": 2,
                   "roi_size": [32, 32, 32], "sw_stride": [16, 16, 16], "sw_batch_size": 2, "num_workers": 0,
                   "bn_recalibration_batches": 1, "diagnostics#interval": 1, **overrides})  # fmt: skip
    return parser


def _train(parser: ConfigParser) -> dict:
    for expr in parser["initialize"]:
        parser.get_parsed_content("initialize#" + str(parser["initialize"].index(expr)))
    trainer = parser.get_parsed_content("train#trainer")
    trainer.run()
    out = trainer.state.output  # decollated: one dict per image, the scalars repeated
    out = out[0] if isinstance(out, list) else out
    return {k: float(v) for k, v in out.items() if k.startswith(("loss", "diag_"))}


def test_a_toy_term_is_one_table_entry(tmp_path: Path, make_phantoms) -> None:
    """A new loss term through the config alone: logged, weighted into the total, and training the net it reads."""
    parser = _parser(tmp_path, make_phantoms("toy_term"))
    parser["loss_terms"]["toy"] = {
        "_target_": "multicure_monai.engines.loss_terms.LossTerm",
        "compute": "$lambda ctx: ctx.logits['auxiliary'].float().square().mean()",
        "weight": 0.01,
        "nets": ["auxiliary"],
    }
    out = _train(parser)
    names = ("sup", "pseudo", "reg", "contrastive", "toy")
    assert out["diag_weight_toy"] == pytest.approx(0.01) and math.isfinite(out["loss_toy"])
    total = sum(out[f"diag_weight_{n}"] * out[f"loss_{n}"] for n in names if f"loss_{n}" in out)
    assert out["loss"] == pytest.approx(total, rel=1e-5)
    assert out["diag_grad_toy_auxiliary"] > 0.0 and out["diag_grad_toy_predictive"] == 0.0
    assert (tmp_path / "models" / "model.pt").is_file()


@pytest.mark.parametrize("net_id", ["predictive_def", "auxiliary_def"])
def test_a_monai_unet_serves_as_either_net(tmp_path: Path, make_phantoms, net_id: str) -> None:
    """Through the adapter, a MONAI UNet trains in either place, validates inside the deployed ensemble, and the
    contrastive term skips it (it has no features) while still training the other net."""
    parser = _parser(tmp_path, make_phantoms(f"unet_{net_id}"))
    parser[net_id] = UNET
    out = _train(parser)
    assert math.isfinite(out["loss"]) and math.isfinite(out["loss_contrastive"])
    other = "auxiliary" if net_id == "predictive_def" else "predictive"
    assert out[f"diag_grad_contrastive_{other}"] > 0.0
    state = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    prefix = "predictive" if net_id == "predictive_def" else "auxiliary"
    assert any(k.startswith(f"{prefix}.network.model.") for k in state)
