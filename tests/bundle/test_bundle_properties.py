"""The model-zoo's bundle check: each workflow's required properties exist under the standard ids, then it runs.

Mirrors the model-zoo CI (``ConfigWorkflow(...).check_properties()`` then ``run()``, as its spleen bundle test
does) on tiny phantoms: train, then evaluate and infer with the trained ``models/model.pt``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from monai.bundle import ConfigWorkflow

CONFIGS = Path(__file__).resolve().parents[2] / "bundle" / "configs"
TINY = {
    "max_iterations": 2,
    "val_interval": 2,
    "sw_batch_size": 2,
    "num_workers": 0,
    "bn_recalibration_batches": 2,
    "device": "$torch.device('cpu')",
}
WORKFLOWS = {
    "train": ["train.yaml"],
    "eval": ["train.yaml", "evaluate.yaml"],
    "infer": ["inference.yaml"],
}

pytestmark = pytest.mark.slow


def _workflow(kind: str, root: Path, datalist: Path) -> ConfigWorkflow:
    return ConfigWorkflow(
        config_file=[str(CONFIGS / name) for name in WORKFLOWS[kind]],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type=kind,
        bundle_root=str(root),
        datalist=str(datalist),
        **TINY,
    )


def _check_and_run(kind: str, root: Path, datalist: Path) -> None:
    workflow = _workflow(kind, root, datalist)
    workflow.initialize()
    assert workflow.check_properties() == []
    workflow.run()
    workflow.finalize()


@pytest.fixture(scope="module")
def trained(make_phantoms) -> tuple[Path, Path]:
    """A bundle root trained by the train workflow (properties checked first)."""
    datalist = make_phantoms("zoo_bundle", seed=5)
    root = datalist.parent.parent
    _check_and_run("train", root, datalist)
    return root, datalist


def test_train_workflow_writes_the_model(trained: tuple[Path, Path]) -> None:
    assert (trained[0] / "models" / "model.pt").is_file()


@pytest.mark.parametrize("kind, output", [("eval", "eval/metrics.csv"), ("infer", "eval/inference/**/*.nii.gz")])
def test_workflow_has_its_properties_and_runs(trained: tuple[Path, Path], kind: str, output: str) -> None:
    root, datalist = trained
    _check_and_run(kind, root, datalist)
    assert list(root.glob(output))
