"""train, evaluate and inference configs agree for every protocol overlay and architecture switch.

inference.yaml stands alone (MONAI Label reads it without train.yaml), so this test is what keeps the copies
equal: the deployed network's state-dict keys and shapes, the image preprocessing, the sliding window and the
deployment settings, parsed exactly as the bundle runs them. Also: every ``$`` expression of the configs fits one
short line (the logic lives in named library functions).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

CONFIGS = Path(__file__).resolve().parents[2] / "bundle" / "configs"
MAX_LINE = 120  # characters of a line holding a $ expression
OVERLAYS = [[], ["la.yaml"], ["la.yaml", "la_half.yaml"], ["pancreas.yaml"]]
SWITCHES = [
    {},
    {"multicure#use": False},
    {"multicure#in_predictive": True, "multicure#use": False},
    {"multicure#form": "paper"},
    {"multicure#level": 1},
]
WORKFLOWS = {"train": ["train.yaml"], "evaluate": ["train.yaml", "evaluate.yaml"], "inference": ["inference.yaml"]}


def _parser(workflow: str, overlay: list[str], switches: dict) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / name) for name in WORKFLOWS[workflow] + overlay])
    parser.update({"bundle_root": "/nonexistent", "device": "$torch.device('cpu')", **switches})
    return parser


def _describe(transform: object) -> tuple:
    """A dictionary transform's class and the plain settings of the array transform(s) it wraps."""
    settings = {}
    for name, value in vars(transform).items():
        if hasattr(value, "__dict__") and not isinstance(value, type):
            settings[name] = {k: repr(v) for k, v in vars(value).items() if not k.startswith("_")}
    return type(transform).__name__, settings


def _summary(parser: ConfigParser, workflow: str) -> dict:
    """What must agree: network weights layout, image transforms, window, deployment settings."""
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    preprocessing = parser.get_parsed_content("preprocessing" if workflow == "inference" else "validate#preprocessing")
    image_transforms = [_describe(t) for t in preprocessing.transforms if "image" in getattr(t, "keys", ())]
    return {
        "state_dict": {k: tuple(v.shape) for k, v in net.state_dict().items()},
        "image_transforms": [t for t in image_transforms if t[0] not in ("LoadImaged", "EnsureChannelFirstd")],
        "roi_size": list(parser.get_parsed_content("roi_size")),
        "sw_stride": list(parser.get_parsed_content("sw_stride")),
        "deploy": (
            parser.get_parsed_content("uncertainty_threshold"),
            list(parser.get_parsed_content("deploy_weights")),
            net.predictive_uses_uncertainty,
            parser.get_parsed_content("keep_largest_component"),
        ),
        "classes": (parser.get_parsed_content("num_classes"), parser.get_parsed_content("in_channels")),
    }  # fmt: skip


@pytest.mark.parametrize("switches", SWITCHES, ids=["defaults", "no_multicure", "authors_placement", "paper_form", "level1"])
@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda o: "+".join(o) or "phantoms")
def test_workflows_agree(overlay: list[str], switches: dict) -> None:
    summaries = {w: _summary(_parser(w, overlay, switches), w) for w in WORKFLOWS}
    reference = summaries["train"]
    assert any(name.endswith("Intensityd") or name.endswith("IntensityRanged") for name, _ in reference["image_transforms"])
    for workflow in ("evaluate", "inference"):
        for key, value in reference.items():
            assert summaries[workflow][key] == value, f"{workflow} differs from train in {key} ({overlay}, {switches})"


def test_the_paper_overlay_and_its_inference_flags_agree() -> None:
    """paper.yaml overlays training and evaluation; inference.yaml (standalone) takes its block as two flags."""
    train = _summary(_parser("train", ["paper.yaml"], {}), "train")
    evaluate = _summary(_parser("evaluate", ["paper.yaml"], {}), "evaluate")
    inference = _summary(_parser("inference", [], {"multicure#form": "paper", "multicure#level": 1}), "inference")
    assert train == evaluate == inference
    assert train["state_dict"] != _summary(_parser("inference", [], {}), "inference")["state_dict"]


def test_the_switch_changes_the_network() -> None:
    """The comparison above is not vacuous: the architecture switch does change the deployed weights."""
    with_block = _summary(_parser("inference", [], {}), "inference")["state_dict"]
    without = _summary(_parser("inference", [], {"multicure#use": False}), "inference")["state_dict"]
    assert set(with_block) > set(without) and any("multicure" in k for k in set(with_block) - set(without))


def test_the_form_switch_changes_the_block() -> None:
    """The default is the authors' block (its 1x1x1 branch mixing conv); ``paper`` is the text's block."""
    authors = _summary(_parser("inference", [], {}), "inference")["state_dict"]
    paper = _summary(_parser("inference", [], {"multicure#form": "paper"}), "inference")["state_dict"]
    assert any(".multicure.mix." in k for k in authors) and not any(".multicure.mix." in k for k in paper)


def test_the_level_switch_moves_the_block() -> None:
    """The default puts the block on the quarter-resolution decoder stage (64 channels); ``multicure#level: 1`` on
    the half-resolution one (32 channels), where the paper and the authors' code put it."""
    level2 = _summary(_parser("inference", [], {}), "inference")["state_dict"]
    level1 = _summary(_parser("inference", [], {"multicure#level": 1}), "inference")["state_dict"]
    key = "auxiliary.decoder.multicure.branch_small.conv.weight"
    assert level1[key][0] == 32 and level2[key][0] == 64


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_expressions_fit_one_short_line(config: str) -> None:
    """No line holding a ``$`` is longer than 120 characters (indentation included)."""
    lines = (CONFIGS / config).read_text().splitlines()
    long = [f"{config}:{n} ({len(line)})" for n, line in enumerate(lines, 1) if "$" in line and len(line) > MAX_LINE]
    assert not long, f"move the logic into a named function: {long}"
