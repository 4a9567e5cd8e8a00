"""train.yaml's method switches, parsed as the bundle runs them (no training)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

CONFIGS = Path(__file__).resolve().parents[2] / "bundle" / "configs"


def _parser(**overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / name) for name in ("train.yaml", "la.yaml", "la_half.yaml")])
    parser.update({"bundle_root": "/nonexistent", "device": "$torch.device('cpu')", **overrides})
    return parser


@pytest.mark.parametrize("weight", ["loss_terms#pseudo#weight", "loss_terms#contrastive#weight"])
def test_ramps_do_not_depend_on_the_run_length(weight: str) -> None:
    short = _parser(max_iterations=300).get_parsed_content(weight)
    long = _parser(max_iterations=6000).get_parsed_content(weight)
    for t in (1, 50, 100, 199, 200, 300, 6000):
        assert short(t) == long(t)
    assert short(1) < 0.01 * short(200)  # a ramp-up ...
    assert short(200) == short(6000)  # ... that is flat after unlabelled#rampup_iterations


def test_validation_scores_each_net_next_to_the_ensemble() -> None:
    parser = _parser()
    assert set(parser.get_parsed_content("validate#key_metric")) == {"val_mean_dice"}
    additional = set(parser.get_parsed_content("validate#additional_metrics"))
    for net in ("", "predictive_", "auxiliary_"):
        for metric in ("mean_dice", "jaccard", "hd95", "asd"):
            if net or metric != "mean_dice":
                assert f"val_{net}{metric}" in additional


def test_validation_scores_the_deployed_network() -> None:
    """The ensemble is declared once (network_def): validation wraps the deployed module, whose weights it shares."""
    parser = _parser(roi_size=[32, 32, 32])
    assert parser.get_parsed_content("validate#network").ensemble is parser.get_parsed_content("network")
    assert parser.get_parsed_content("network").predictive is parser.get_parsed_content("predictive_network")


@pytest.mark.parametrize(
    "teacher, has_ema", [("predictive", False), ("better", False), ("ema", True), ("mutual", False)]
)
def test_ema_teacher_is_checkpointed(teacher: str, has_ema: bool) -> None:
    parser = _parser(**{"unlabelled#teacher": teacher, "roi_size": [32, 32, 32]})
    keys = set(parser.get_parsed_content("train#checkpoint_dict"))
    assert keys >= {"network", "aux_network", "optimizer", "lr_scheduler", "model_saver"}
    assert ("ema_network" in keys) == has_ema


@pytest.mark.parametrize(
    "override, expected",
    [({}, ("voxels", 0.7)),
     ({"unlabelled#reg_normalization": "xor", "unlabelled#reg_confidence_threshold": None}, ("xor", None))],
)  # fmt: skip
def test_regularization_switches(override: dict, expected: tuple) -> None:
    reg = _parser(**override).get_parsed_content("loss_terms#reg#compute#loss")
    assert (reg.normalization, reg.confidence_threshold) == expected


def test_batchnorm_recalibration_runs_before_validation_and_checkpoints() -> None:
    """Handlers of one event run in attach order: the statistics must be recomputed before anything reads them."""
    handlers = _parser()["train"]["handlers"]
    targets = [str(h.get("_target_", "")) for h in handlers]
    recal = next(i for i, t in enumerate(targets) if t.endswith("BatchNormRecalibration"))
    readers = [i for i, t in enumerate(targets) if t.endswith(("ValidationHandler", "CheckpointSaver"))]
    assert readers and recal < min(readers)
    assert _parser().get_parsed_content("bn_recalibration_batches") > 0


@pytest.mark.parametrize(
    "override", [{"unlabelled#pseudo_label_threshold": 1.5}, {"val_interval": 0}, {"roi_size": [32, 32]}]
)
def test_initialize_checks_the_config_values(override: dict) -> None:
    parser = _parser(**override)
    assert "$@checks#config" in [str(x).split("  #")[0] for x in parser["initialize"]]
    with pytest.raises(Exception) as info:  # MONAI wraps the check's ValueError in "Failed to instantiate"
        parser.get_parsed_content("checks#config")
    error: BaseException | None = info.value
    while error is not None and not isinstance(error, ValueError):
        error = error.__cause__
    assert error is not None and str(error).startswith("config check failed with 1 value out of range")


def test_default_config_passes_its_check() -> None:
    assert _parser().get_parsed_content("checks#config")


@pytest.mark.parametrize("selection, key_metric, final", [("best", True, False), ("final", False, True)])
def test_model_selection_picks_the_writer_of_model_pt(selection: str, key_metric: bool, final: bool) -> None:
    """best: the key-metric saver of validation writes model.pt; final: the trainer's saver at the end of the run."""
    parser = _parser(model_selection=selection)
    parser["validate"]["dataset"]["data"] = [{"image": "case.nii.gz", "label": "case_label.nii.gz"}]
    assert parser.get_parsed_content("validate#model_saver#save_key_metric") is key_metric
    saver = next(h for h in parser["train"]["handlers"] if h.get("final_filename") == "model.pt")
    disabled = parser.get_parsed_content(f"train#handlers#{parser['train']['handlers'].index(saver)}#_disabled_")
    assert disabled is not final


@pytest.mark.parametrize("policy, last_lr", [("step", 0.01), ("poly", 0.0)])
def test_lr_policy_switch(policy: str, last_lr: float) -> None:
    parser = _parser(**{"optim#lr_policy": policy, "max_iterations": 300, "roi_size": [32, 32, 32]})
    scheduler = parser.get_parsed_content("lr_scheduler")
    for _ in range(300):
        scheduler.optimizer.step()
        scheduler.step()
    assert scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(last_lr)


@pytest.mark.parametrize("view", ["none", "perturb", "copy_paste"])
def test_student_view_switch_reaches_the_trainer(view: str) -> None:
    """The trainer builds the view from its name (tests/engines/test_unlabelled_teaching.py)."""
    parser = _parser(**{"unlabelled#student_view": view, "roi_size": [32, 32, 32]})
    assert parser.get_parsed_content("train#trainer#student_view") == view


@pytest.mark.parametrize("lambda_mistake, rows", [(0.0, ["sup", "pseudo", "reg", "contrastive"]),
                                                  (0.5, ["sup", "pseudo", "reg", "mistake", "contrastive"])])  # fmt: skip
def test_mistake_row_is_in_the_table_only_when_weighted(lambda_mistake: float, rows: list) -> None:
    table = _parser(**{"supervised#lambda_mistake": lambda_mistake}).get_parsed_content("loss_terms")
    assert list(table) == rows
    if lambda_mistake:
        assert (table["mistake"].weight_at(1), table["mistake"].part) == (0.5, "labelled")


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_teacher_warm_up_switch(warmup: bool) -> None:
    parser = _parser(**{"unlabelled#teacher": "ema", "unlabelled#ema_warmup": warmup, "roi_size": [32, 32, 32]})
    ema, net = parser.get_parsed_content("train#ema_network"), parser.get_parsed_content("predictive_network")
    ema.update_parameters(net)
    before = next(ema.module.parameters()).clone()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update_parameters(net)
    moved = float(next(ema.module.parameters()).sub(before).abs().max())
    assert moved == pytest.approx(0.5 if warmup else 0.01, abs=1e-4)
