"""The bundle's command line: the input error printed last, and unknown overrides refused with a "did you mean"."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from multicure_monai import bundle_cli
from multicure_monai.bundle_cli import check_overrides, parse_command_line
from multicure_monai.errors import BundleInputError, MissingFileError, find_bundle_input_error

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"
TRAIN, EVALUATE, INFER = (str(CONFIGS / f) for f in ("train.yaml", "evaluate.yaml", "inference.yaml"))


def _wrapped(error: BaseException) -> RuntimeError:
    """``error`` wrapped twice as MONAI's config parser does (``raise RuntimeError(...) from e``)."""
    try:
        try:
            try:
                raise error
            except Exception as e:
                raise RuntimeError("Failed to evaluate ConfigExpression") from e
        except RuntimeError as e:
            raise RuntimeError("Failed to instantiate component") from e
    except RuntimeError as outer:
        return outer


@pytest.mark.parametrize(
    "error, found",
    [(BundleInputError("bad datalist"), True), (MissingFileError("gone"), True), (ValueError("other"), False)],
)
def test_finds_the_input_error_in_the_chain(error: BaseException, found: bool) -> None:
    assert (find_bundle_input_error(_wrapped(error)) is error) is found


@pytest.mark.parametrize("debug", [None, "env", "config"])
def test_excepthook_prints_the_input_error_last(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, debug: str | None
) -> None:
    calls = []
    monkeypatch.setitem(bundle_cli._state, "previous_hook", lambda *args: calls.append(args))
    monkeypatch.setitem(bundle_cli._state, "debug", debug == "config")
    monkeypatch.setenv(bundle_cli.DEBUG_ENV, "1" if debug == "env" else "")
    outer = _wrapped(BundleInputError("datalist check failed with 1 problem:\n  a.nii.gz: label file not found"))
    bundle_cli._excepthook(type(outer), outer, outer.__traceback__)
    err = capsys.readouterr().err
    if debug:
        assert calls and calls[0][1] is outer and not err  # the full traceback, by the previous hook
        return
    assert not calls
    lines = err.rstrip().splitlines()
    assert lines[-2:] == ["BundleInputError: datalist check failed with 1 problem:", "  a.nii.gz: label file not found"]
    assert "MULTICURE_DEBUG=1" in lines[-3] and "Failed to" not in err and "Traceback" not in err


def test_other_errors_keep_their_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setitem(bundle_cli._state, "previous_hook", lambda *args: calls.append(args))
    outer = _wrapped(KeyError("a bug"))
    bundle_cli._excepthook(type(outer), outer, outer.__traceback__)
    assert calls and calls[0][1] is outer


def test_install_chains_to_the_previous_hook_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    monkeypatch.setitem(bundle_cli._state, "previous_hook", None)
    bundle_cli.install_excepthook()
    bundle_cli.install_excepthook()
    assert sys.excepthook is bundle_cli._excepthook
    assert bundle_cli._state["previous_hook"] is sys.__excepthook__


@pytest.mark.parametrize(
    "argv, run_args, overrides",
    [
        (["run", "training", "--config_file", "a.yaml", "--use_multicur", "False"],
         {"config_file": "a.yaml"}, ["use_multicur"]),
        (["run", "--run_id=training", "--config_file=['a.yaml', 'b.yaml']", "--learning-rate", "-0.1", "--amp"],
         {"run_id": "training", "config_file": ["a.yaml", "b.yaml"]}, ["learning_rate", "amp"]),
        (["run", "training", "--tracking", "mlflow", "--train::trainer::max_epochs", "3", "--", "--help"],
         {"tracking": "mlflow"}, ["train#trainer#max_epochs"]),
        (["run", "inference", "--meta_file", "m.json", "--logging_file", "l.conf", "--input_dir", "in"],
         {"meta_file": "m.json", "logging_file": "l.conf"}, ["input_dir"]),
    ],
)  # fmt: skip
def test_parse_command_line_as_fire_does(argv: list[str], run_args: dict, overrides: list[str]) -> None:
    assert parse_command_line(argv) == (run_args, overrides)


@pytest.mark.parametrize(
    "config_file, args, expected",
    [
        (TRAIN, ["--multicure#us", "False"], ["--multicure#us: no config id 'multicure#us' in train.yaml; did you "
                                              "mean --multicure#use", "--allowed_new_ids \"['multicure#us']\""]),
        (TRAIN, ["--max_iteration", "5", "--optim#lerning_rate", "0.1"], ["unknown command-line overrides",
                                                                          "did you mean --max_iterations",
                                                                          "did you mean --optim#learning_rate"]),
        ([TRAIN, EVALUATE], ["--datalist_keys#validaton", "test"],
         ["in train.yaml, evaluate.yaml; did you mean --datalist_keys#validation"]),
        # a switch that lives in a group is named with its group
        (TRAIN, ["--use_multicure", "False", "--teacher", "mutual", "--lr_policy", "poly"],
         ["did you mean --multicure#use", "did you mean --unlabelled#teacher", "did you mean --optim#lr_policy"]),
        (INFER, ["--input_dri", "x"], ["did you mean --input_dir"]),
        (TRAIN, ["--train#trainer#max_epoch", "3"], ["did you mean --train#trainer#max_epochs"]),
    ],
)  # fmt: skip
def test_unknown_override_is_an_error(config_file, args: list[str], expected: list[str]) -> None:
    with pytest.raises(BundleInputError) as err:
        check_overrides(["run", "training", "--config_file", str(config_file), *args])
    print(err.value)
    for fragment in expected:
        assert fragment in str(err.value)


@pytest.mark.parametrize(
    "args, allowed",
    [
        (["--multicure#use", "False", "--train#trainer#max_epochs", "3", "--precision::amp"], ()),
        (["--tracking", "mlflow", "--experiment_name", "e", "--run_name", "r", "--tracking_uri", "file:x"], ()),
        (["--my_new_id", "3", "--extra#nested", "1"], ("my_new_id", "extra")),
        (["--meta_file", "m.json", "--logging_file", "l.conf", "--_meta_#version", "1"], ()),
    ],
)
def test_known_and_allowed_overrides_pass(args: list[str], allowed: tuple[str, ...]) -> None:
    assert check_overrides(["run", "training", "--config_file", TRAIN, *args], allowed_new_ids=allowed)


def test_a_new_loss_term_is_allowed_by_train_yaml() -> None:
    """A term of one's own is one new entry of ``loss_terms``: train.yaml's allow-list admits it."""
    from monai.bundle import ConfigParser

    allowed = ConfigParser.load_config_file(TRAIN)["checks"]["allowed_new_ids"]
    assert check_overrides(["run", "training", "--config_file", TRAIN, "--loss_terms#toy#weight", "0.1"],
                           allowed_new_ids=allowed)  # fmt: skip


def test_args_file_keys_are_overrides(tmp_path: Path) -> None:
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"config_file": TRAIN, "max_iterations": 3, "val_intervall": 3}))
    with pytest.raises(BundleInputError, match="--val_intervall: .*did you mean --val_interval"):
        check_overrides(["run", "training", "--args_file", str(args_file)])


def test_no_check_outside_the_bundle_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["pytest", "--config_file", TRAIN, "--not_an_id", "1"])
    assert not bundle_cli.is_bundle_command()
    assert bundle_cli.check_command_line(debug=False)
