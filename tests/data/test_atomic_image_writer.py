"""Masks are written whole or not at all (multicure_monai/data/atomic_image_writer.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.data.image_writer import NibabelWriter
from monai.transforms import SaveImage

from multicure_monai.data.atomic_image_writer import AtomicWriteMixin, atomic_writer
from multicure_monai.atomic_files import TMP_SUFFIX

REPO = Path(__file__).resolve().parents[2]


def _mask(seed: int = 0) -> MetaTensor:
    data = torch.from_numpy(np.random.default_rng(seed).integers(0, 2, (1, 32, 32, 32)).astype(np.uint8))
    affine = torch.diag(torch.tensor([0.8, 0.8, 2.0, 1.0], dtype=torch.float64))
    return MetaTensor(data, affine=affine, meta={"filename_or_obj": "case_01.nii.gz"})


@pytest.mark.parametrize("ext", ["nii.gz", ".nii"])
def test_writes_what_monai_writes(tmp_path: Path, ext: str) -> None:
    writer = atomic_writer(ext)
    assert issubclass(writer, AtomicWriteMixin) and issubclass(writer, NibabelWriter)  # nibabel: no ITK here
    out_ext = "." + ext.lstrip(".")
    for name, cls in [("atomic", writer), ("plain", NibabelWriter)]:
        SaveImage(output_dir=tmp_path / name, output_ext=out_ext, output_dtype=np.uint8, resample=False,
                  separate_folder=False, print_log=False, writer=cls)(_mask())  # fmt: skip
    atomic, plain = (nib.load(next((tmp_path / n).iterdir())) for n in ("atomic", "plain"))
    assert np.array_equal(atomic.get_fdata(), plain.get_fdata()) and np.allclose(atomic.affine, plain.affine)
    assert sorted(os.listdir(tmp_path / "atomic")) == [f"case_01_trans{out_ext}"]
    assert oct(os.stat(tmp_path / "atomic" / f"case_01_trans{out_ext}").st_mode & 0o777) == "0o644"


KILLED_WRITER = textwrap.dedent(
    """
    import os, shutil, signal, sys
    import numpy as np, torch
    from monai.data import MetaTensor
    from monai.transforms import SaveImage
    from multicure_monai.data.atomic_image_writer import atomic_writer

    def copy_half_then_die(src, dst, *args):  # SIGKILL in the middle of the write into the output folder
        data = src.read()
        dst.write(data[: len(data) // 2])
        dst.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    shutil.copyfileobj = copy_half_then_die
    mask = MetaTensor(torch.ones(1, 32, 32, 32, dtype=torch.uint8), meta={"filename_or_obj": "case_02.nii.gz"})
    SaveImage(output_dir=sys.argv[1], output_dtype=np.uint8, resample=False, separate_folder=False,
              print_log=False, writer=atomic_writer("nii.gz"))(mask)
    """
)


def test_a_killed_write_leaves_no_mask(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    names = os.listdir(tmp_path)
    assert not [n for n in names if n.endswith(".nii.gz")], names  # no mask that looks valid
    assert all(n.startswith(".") and n.endswith(TMP_SUFFIX) for n in names), names


def test_inference_config_writes_every_file_atomically() -> None:
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundle" / "configs" / "inference.yaml"))
    parser["save_uncertainty"] = True
    savers = [t for t in parser.get_parsed_content("postprocessing").transforms if type(t).__name__ == "SaveImaged"]
    assert len(savers) == 1 + len(parser["uncertainty_maps"])
    for saver in savers:
        assert all(issubclass(w, AtomicWriteMixin) for w in saver.saver.writers)
