"""multicure_monai/handlers/checkpoint_resume.py: what a resume checkpoint holds (the loader: test_resume.py)."""

from __future__ import annotations

import pytest

from multicure_monai.handlers import resume_checkpoint_dict

REQUIRED = ("network", "aux_network", "optimizer", "lr_scheduler", "model_saver")


@pytest.mark.parametrize("with_ema", [False, True])
def test_resume_checkpoint_dict(with_ema: bool) -> None:
    objects = {name: object() for name in REQUIRED}
    ema_network = object() if with_ema else None
    result = resume_checkpoint_dict(**objects, ema_network=ema_network)
    assert list(result) == list(REQUIRED) + (["ema_network"] if with_ema else [])  # the file's keys, in order
    assert all(result[name] is objects[name] for name in REQUIRED)  # the objects themselves
    assert result.get("ema_network") is ema_network
