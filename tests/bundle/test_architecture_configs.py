"""The bundle configs compare model.pt's architecture record before loading it: evaluation, inference and
MONAI Label's fine-tuning (its plain CheckpointLoader) name the switch to pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from multicure_monai.handlers.checkpoint_architecture import write_sidecar
from multicure_monai.errors import BundleInputError

CONFIGS = Path(__file__).resolve().parents[2] / "bundle" / "configs"


def _parser(files: list[str], root: Path, datalist: Path, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in files])
    parser.update({"bundle_root": str(root), "datalist": str(datalist), "device": "$torch.device('cpu')",
                   "num_workers": 0, **overrides})  # fmt: skip
    return parser


def _bundle_error(excinfo: pytest.ExceptionInfo) -> BundleInputError:
    """The BundleInputError in the chain (the config parser wraps an expression's error)."""
    e: BaseException | None = excinfo.value
    while e is not None and not isinstance(e, BundleInputError):
        e = e.__cause__ or e.__context__
    assert e is not None, f"no BundleInputError in {excinfo.value!r}"
    return e


@pytest.fixture(scope="module")
def level2_bundle(make_phantoms) -> tuple[Path, Path]:
    """A bundle root whose models/model.pt was trained with the defaults (multicure#level 2) and has its record."""
    datalist = make_phantoms("architecture")
    root = datalist.parent.parent
    parser = _parser(["inference.yaml"], root, datalist)
    (root / "models").mkdir()
    torch.save(parser.get_parsed_content("network_def").state_dict(), root / "models" / "model.pt")
    write_sidecar(root / "models" / "model.pt", parser.get_parsed_content("architecture"))
    return root, datalist


@pytest.mark.parametrize(
    "files, engine", [(["inference.yaml"], "evaluator"), (["train.yaml", "evaluate.yaml"], "evaluator")]
)
def test_mismatched_model_pt_names_the_switch(level2_bundle, files: list[str], engine: str) -> None:
    root, datalist = level2_bundle
    parser = _parser(files, root, datalist, **{"multicure#level": 1})
    with pytest.raises(Exception) as excinfo:
        parser.get_parsed_content(engine).run()
    message = str(_bundle_error(excinfo))
    assert "model.pt" in message and "--multicure#level 2" in message and "size mismatch" not in message


def test_monailabel_finetune_checks_model_pt_before_training(level2_bundle) -> None:
    """MONAI Label inserts MONAI's own CheckpointLoader (model.pt into `network`) at the front of train#handlers."""
    root, datalist = level2_bundle
    parser = _parser(["train.yaml"], root, datalist, **{"multicure#level": 1, "multicure#use": False})
    handlers = parser.get("train#handlers")
    handlers.insert(0, {"_target_": "CheckpointLoader", "load_path": str(root / "models" / "model.pt"),
                        "load_dict": {"model": "$@network"}, "strict": False})  # fmt: skip
    parser["train#handlers"] = handlers
    with pytest.raises(Exception) as excinfo:
        parser.get_parsed_content("train#trainer_handlers")
    message = str(_bundle_error(excinfo))
    assert "--multicure#level 2" in message and "--multicure#use True" in message
    # with the switches it was trained with, the same list builds
    ok = _parser(["train.yaml"], root, datalist)
    ok["train#handlers"] = handlers
    built = ok.get_parsed_content("train#trainer_handlers")
    assert type(built[0]).__name__ == "CheckpointLoader" and built[0].load_path == str(root / "models" / "model.pt")
