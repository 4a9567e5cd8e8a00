"""inference.yaml picks its speed settings from the device, also when the device is given as a string."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

CONFIG = Path(__file__).resolve().parents[2] / "bundle" / "configs" / "inference.yaml"


@pytest.mark.parametrize(
    "device, sw_batch_size, memory_format",
    [
        ("cpu", 4, torch.channels_last_3d),  # MONAI Label's BundleInferTask writes the device as a string
        ("cuda", 8, torch.contiguous_format),
        ("$torch.device('cpu')", 4, torch.channels_last_3d),
        ("$torch.device('cuda:0')", 8, torch.contiguous_format),
    ],
)
def test_speed_settings_follow_the_device(device: str, sw_batch_size: int, memory_format: torch.memory_format) -> None:
    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    parser["device"] = device
    assert parser.get_parsed_content("sw_batch_size") == sw_batch_size
    assert parser.get_parsed_content("precision#memory_format") == memory_format
    assert parser.get_parsed_content("inferer").sw_batch_size == sw_batch_size
