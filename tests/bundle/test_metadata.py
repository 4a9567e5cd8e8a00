"""metadata.json against the vendored bundle schema, and its consistency with the configs."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from monai.bundle import ConfigParser

import multicure_monai

CONFIGS = Path(__file__).resolve().parents[2] / "bundle" / "configs"
# the model-zoo's current schema (MONAI-extra-test-data 0.8.1), vendored: CI has no internet
SCHEMA = Path(__file__).resolve().parent / "data" / "meta_schema_20240725.json"


@pytest.fixture(scope="module")
def metadata() -> dict:
    with open(CONFIGS / "metadata.json") as f:
        return json.load(f)


def test_metadata_matches_schema(metadata: dict) -> None:
    with open(SCHEMA) as f:
        jsonschema.validate(metadata, json.load(f))


@pytest.mark.parametrize("broken", ["version", "network_data_format", "authors"])
def test_schema_rejects_missing_required_keys(metadata: dict, broken: str) -> None:
    with open(SCHEMA) as f:
        schema = json.load(f)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({k: v for k, v in metadata.items() if k != broken}, schema)


def test_channel_def_names_every_class(metadata: dict) -> None:
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.yaml"))
    num_classes = parser.get_parsed_content("num_classes")
    pred = metadata["network_data_format"]["outputs"]["pred"]
    assert pred["num_channels"] == num_classes
    assert sorted(pred["channel_def"]) == [str(i) for i in range(num_classes)]
    assert list(metadata["network_data_format"]["inputs"]) == ["image"]
    assert metadata["changelog"].get(metadata["version"])


def test_changelog_entries_are_one_line(metadata: dict) -> None:
    """What changed, in a line; the evidence and the detail live in docs/results.md and the git log."""
    for version, entry in metadata["changelog"].items():
        assert entry and "\n" not in entry and len(entry) <= 120, version


def test_metadata_names_the_schema_it_is_checked_against(metadata: dict) -> None:
    assert metadata["schema"].endswith("/" + SCHEMA.name)


def test_one_version_number(metadata: dict) -> None:
    """The bundle and the library it requires are released together."""
    assert metadata["version"] == multicure_monai.__version__
    assert metadata["required_packages_version"]["multicure-monai"] == multicure_monai.__version__


def test_monai_reads_the_required_packages(metadata: dict) -> None:
    """MONAI maps the deprecated ``optional_packages_version`` onto ``required_packages_version`` when parsing,
    so an empty one would erase the requirements."""
    parser = ConfigParser()
    parser.read_meta(str(CONFIGS / "metadata.json"))
    assert parser.get_parsed_content("_meta_#required_packages_version") == metadata["required_packages_version"]
    assert {"multicure-monai", "pytorch-ignite", "itk", "nibabel", "h5py"} <= set(metadata["required_packages_version"])
