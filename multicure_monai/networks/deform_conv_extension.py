"""Just-in-time build of the fused CPU sampling kernels of the 3D deformable convolution.

The pure PyTorch ``"gather"`` path of :func:`multicure_monai.networks.deform_conv.deform_conv3d` spends most of
its CPU time in generic gather / sort / scatter kernels and their temporaries. ``csrc/deform_conv3d_cpu.cpp``
does the same sampling in one OpenMP loop nest per pass (forward columns; backward columns, offset, mask and
input gradients in one sweep). PyTorch has no 3D deformable sampling kernel and a compiled dependency (mmcv)
is not an option, so the source ships with the package and is compiled on first use with
``torch.utils.cpp_extension.load`` (C++ compiler and ninja needed; about a minute once, then cached under
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``). When the build fails, or
``MULTICURE_DEFORM_CONV_EXTENSION=0`` is set, :func:`load_cpu_extension` returns None, warns once, and the
convolution falls back to the pure PyTorch path, which computes the same function.

Torch serialises builds with a ``lock`` file in the build folder that only the builder deletes: a process
killed mid-build leaves it, and every later load waits on it forever. :func:`_load_locked` therefore builds
under a :class:`~multicure_monai.process_lock.ProcessLock` (released by the OS when its holder dies): whoever
holds that lock knows no live builder exists, so a torch ``lock`` file then found is stale and is removed. A
wait on a live builder longer than a minute is logged with the builder's pid.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import shutil
import warnings
from pathlib import Path
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from multicure_monai.process_lock import ProcessLock

__all__ = ["COMPILE_FLAGS", "EXTENSION_ENV", "ISA_ENV", "SOURCE", "load_cpu_extension"]

#: Environment variable; ``0`` disables the compiled CPU kernels (pure PyTorch fallback).
EXTENSION_ENV = "MULTICURE_DEFORM_CONV_EXTENSION"

#: Seconds a load waits on another process's build before it logs what it waits for (and again as often).
BUILD_WAIT_WARNING_S = 60.0

_logger = logging.getLogger(__name__)

#: Environment variable; ``avx2`` or ``base`` builds the kernels for less than the CPU has (e.g. to compare builds).
ISA_ENV = "MULTICURE_DEFORM_CONV_ISA"

#: Compiler flags per vector ISA; ``avx512`` also asks GCC/Clang for 512-bit vectors (their default is 256).
_ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mprefer-vector-width=512"],
    "avx2": ["-mavx2", "-mfma"],
    "base": [],
}

#: Compiler flags of every build. ``-fno-trapping-math`` lets GCC vectorise ``std::floor`` (the kernels never read
#: floating-point exception flags, and the values are unchanged).
COMPILE_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math"]

#: The C++ source compiled on first use.
SOURCE = Path(__file__).resolve().parent / "csrc" / "deform_conv3d_cpu.cpp"


def _ensure_ninja_on_path() -> None:
    """``torch.utils.cpp_extension`` calls ``ninja`` from ``PATH``; the ``ninja`` wheel may sit in a venv not on it."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja  # the PyPI wheel, a dependency of this package
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _isa_flags() -> tuple[str, list[str]]:
    """Vector-ISA compiler flags matching what PyTorch detected on this CPU, and a tag for the build name.

    The tag is part of the extension name, so a build cached for an AVX-512 or AVX2 machine is never loaded on one
    without it (``TORCH_EXTENSIONS_DIR`` may be shared). ``MULTICURE_DEFORM_CONV_ISA`` may lower the ISA, never
    raise it above what PyTorch detected.
    """
    cap = torch.backends.cpu.get_cpu_capability()
    order = ["base"]
    if platform.machine().lower() in ("x86_64", "amd64") and cap in ("AVX2", "AVX512"):
        order += ["avx2", "avx512"] if cap == "AVX512" else ["avx2"]
    tag = order[-1]
    asked = os.environ.get(ISA_ENV, "").strip().lower()
    if asked in order:
        tag = asked
    return tag, list(_ISA_FLAGS[tag])


def _load_locked(load: Callable[..., ModuleType], **kwargs: Any) -> ModuleType:
    """``load(**kwargs)`` (``torch.utils.cpp_extension.load``) under a process lock that cannot go stale.

    The lock file sits in the extension's build folder (``build_directory``, else torch's own choice for
    ``name``). While it is held, no live process of this package is inside ``load`` for this extension, so
    torch's ``lock`` file there, if any, was left by a killed build and is removed before ``load`` would
    wait on it forever.

    Args:
        load: ``torch.utils.cpp_extension.load``.
        kwargs: its arguments (``name`` at least).

    Returns:
        What ``load`` returns: the extension module.
    """
    from torch.utils.cpp_extension import _get_build_directory  # the folder `load` itself builds in

    build_dir = kwargs.get("build_directory") or _get_build_directory(kwargs["name"], False)
    lock = ProcessLock(os.path.join(build_dir, "multicure_build.lock"))
    lock.acquire(warn_after=BUILD_WAIT_WARNING_S, what=f"the C++ kernel build of {kwargs['name']}")
    try:
        stale = os.path.join(build_dir, "lock")
        if lock.locked and os.path.exists(stale):  # not locked: no fcntl (Windows), a live builder is possible
            _logger.warning(f"removing {stale}, left by a kernel build that was killed (no live builder holds it)")
            os.remove(stale)
        return load(**kwargs)
    finally:
        lock.release()


@functools.lru_cache(maxsize=None)
def load_cpu_extension() -> ModuleType | None:
    """Build (first call on a machine) and import the CPU kernels; None when disabled or not buildable.

    Returns:
        the extension module with ``columns``, ``backward``, ``fused_forward`` and ``fused_backward`` (see the C++
        source for the layouts), or None.
    """
    if os.environ.get(EXTENSION_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        from torch.utils.cpp_extension import load

        _ensure_ninja_on_path()
        tag, isa = _isa_flags()
        torch_tag = "".join(ch if ch.isalnum() else "_" for ch in torch.__version__)
        return _load_locked(
            load,
            # ISA and torch version in the name: a cached build is only reused by a matching CPU and torch
            name=f"multicure_deform_conv3d_cpu_{tag}_torch{torch_tag}",
            sources=[str(SOURCE)],
            extra_cflags=[*COMPILE_FLAGS, *isa],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # noqa: BLE001 - any build/import failure means: use the pure PyTorch path
        warnings.warn(
            f"could not build the fused CPU deformable-convolution kernels ({type(e).__name__}: {e}); "
            f"using the pure PyTorch gather path (same results, slower). Set {EXTENSION_ENV}=0 to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
