"""TorchScript export with MONAI's ``ckpt_export``: traced files that load and compute what the eager nets compute."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, ckpt_export

from multicure_monai.networks.vnet import SCRIPT_UNSUPPORTED

BUNDLE = Path(__file__).resolve().parents[2] / "bundle"
INFERENCE = str(BUNDLE / "configs" / "inference.yaml")
META = str(BUNDLE / "configs" / "metadata.json")
SHAPE = [1, 1, 32, 32, 32]  # inference.yaml's roi_size: the size the sliding window feeds


def _net(net_id: str, root: Path) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(INFERENCE)
    parser.update({"bundle_root": str(root), "device": "$torch.device('cpu')"})
    return parser.get_parsed_content(net_id).eval()


@pytest.mark.parametrize("net_id, key", [("network_def", None), ("predictive_def", "network")])
def test_traced_export_equals_the_eager_net(tmp_path: Path, net_id: str, key: str | None) -> None:
    """The deployed ensemble (both nets, the deformable convolution included) from a model.pt state dict, and the
    predictive net alone from a training checkpoint's ``network`` entry (test_bundle_workflow exports a trained
    models/model.pt through the command line)."""
    torch.manual_seed(0)
    eager = _net(net_id, tmp_path)
    state = eager.state_dict()
    ckpt = tmp_path / "model.pt"
    torch.save(state if key is None else {key: state}, ckpt)
    ts = tmp_path / "model.ts"
    ckpt_export(
        net_id=net_id, filepath=str(ts), ckpt_file=str(ckpt), meta_file=META, config_file=INFERENCE,
        key_in_ckpt=key or "", use_trace=True, input_shape=SHAPE, bundle_root=str(tmp_path),
        device="$torch.device('cpu')",
    )
    loaded = torch.jit.load(str(ts))
    for scale in (1.0, 3.0):  # inputs other than the traced one
        x = scale * torch.randn(*SHAPE)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), eager(x), rtol=1e-4, atol=1e-4)


def test_auxiliary_net_traces_with_its_uncertainty_input(tmp_path: Path) -> None:
    torch.manual_seed(0)
    aux = _net("auxiliary_def", tmp_path)
    x, u = torch.randn(*SHAPE), (torch.rand(*SHAPE) > 0.8).float()
    with torch.no_grad():
        traced = torch.jit.trace(aux, (x, u), check_trace=False)
        x2, u2 = 2 * torch.randn(*SHAPE), (torch.rand(*SHAPE) > 0.5).float()
        torch.testing.assert_close(traced(x2, u2), aux(x2, u2), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("net_id", ["network_def", "predictive_def", "auxiliary_def"])
def test_scripting_says_to_trace(tmp_path: Path, net_id: str) -> None:
    with pytest.raises(RuntimeError, match="use_trace True") as info:
        torch.jit.script(_net(net_id, tmp_path))
    assert str(info.value) == SCRIPT_UNSUPPORTED
