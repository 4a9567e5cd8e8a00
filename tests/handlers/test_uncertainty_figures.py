"""UncertaintyFigures writes a reliability diagram and per-case panels (headless PNGs) at the end of a run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor

from multicure_monai.handlers.uncertainty_figures import UncertaintyFigures

PNG = b"\x89PNG\r\n\x1a\n"


def _case(index: int) -> dict:
    g = torch.Generator().manual_seed(index)
    label = torch.zeros(1, 12, 10, 8, dtype=torch.long)
    label[:, 3:9, 2:8, 2:6] = 1
    fg = (0.8 * label + 0.1 + 0.1 * torch.rand(label.shape, generator=g)).float()
    image = MetaTensor(label.float() + 0.2 * torch.randn(label.shape, generator=g), meta={"filename_or_obj": f"/d/case{index}.nii.gz"})
    return {"image": image, "label": label, "prob": torch.cat([1 - fg, fg])}


@pytest.mark.parametrize("num_cases, batches", [(1, 2), (3, 2)])
def test_writes_the_reliability_diagram_and_the_panels(tmp_path: Path, num_cases: int, batches: int) -> None:
    engine = Engine(lambda e, batch: [_case(2 * e.state.iteration), _case(2 * e.state.iteration + 1)])
    UncertaintyFigures(str(tmp_path), num_cases=num_cases, name="ensemble").attach(engine)
    engine.run(range(batches))
    reliability = tmp_path / "reliability_ensemble.png"
    assert reliability.read_bytes()[:8] == PNG
    panels = sorted(p.name for p in tmp_path.glob("uncertainty_*.png"))
    assert len(panels) == min(num_cases, 2 * batches) and panels[0] == "uncertainty_case2.png"
    assert all((tmp_path / p).read_bytes()[:8] == PNG for p in panels)


def test_nothing_evaluated_writes_nothing(tmp_path: Path) -> None:
    engine = Engine(lambda e, batch: [])
    UncertaintyFigures(str(tmp_path / "figs")).attach(engine)
    engine.run(range(1))
    assert not (tmp_path / "figs").exists()
