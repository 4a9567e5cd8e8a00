"""metadata.json against the vendored bundle schema, and its consistency with the configs."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from monai.bundle import ConfigParser

CONFIGS = Path(__file__).resolve().parents[2] / "bundle" / "configs"
SCHEMA = Path(__file__).resolve().parent / "data" / "meta_schema.json"


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
