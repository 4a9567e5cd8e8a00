"""Checkpoints that know the switches which shaped their networks, and a loading check that names each mismatch.

A ``model.pt`` trained with ``multicure#level: 2`` does not fit networks built with ``multicure#level: 1``;
PyTorch's own error is a long ``size mismatch for auxiliary.decoder.multicure...`` list that names no switch.
The switches (``num_classes``, ``in_channels`` and the ``multicure`` group: the ``architecture`` id of the bundle
configs) are recorded by config id (:func:`~multicure_monai.config_ids.flatten_ids`, e.g. ``multicure#level``)
when a checkpoint is written and compared before one is loaded:

* resume checkpoints (a dict of state dicts) hold them under the key :data:`ARCHITECTURE_KEY`, through
  :class:`ArchitectureRecord` in the saver's ``save_dict``;
* the deployed ``model.pt`` stays the bare state dict that ignite writes for a one-object ``save_dict``, and
  the switches go to a side-car JSON file (:func:`sidecar_path`, ``model.architecture.json``) holding the
  SHA-256 of the ``model.pt`` it describes. A side-car rather than an extra entry in the file: MONAI's
  ``CheckpointLoader`` (strict), MONAI Label's loader, ``copy_model_state`` and a plain
  ``net.load_state_dict(torch.load("model.pt"))`` all read that bare state dict unchanged, and a non-tensor
  entry in it would be an unexpected key for each of them. The hash makes a side-car that no longer belongs
  to its ``model.pt`` (one replaced by hand) count as absent rather than as a wrong record.

Checkpoints without a record (written before this check) still load; only when their weights then do not fit
does :func:`explain_load_error` name the switches to set. A record written before the switches were grouped
(version 0.12.0) names them by their flat ids then (``multicure_level``); :func:`read_architecture` reads
them as today's ids.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from multicure_monai.atomic_files import atomic_write
from multicure_monai.config_ids import flatten_ids
from multicure_monai.errors import BundleInputError

__all__ = [
    "ARCHITECTURE_KEY",
    "SIDECAR_SUFFIX",
    "ArchitectureRecord",
    "sidecar_path",
    "write_sidecar",
    "read_architecture",
    "check_architecture",
    "explain_load_error",
]

#: Key of the record in a resume checkpoint (a dict of state dicts).
ARCHITECTURE_KEY = "architecture"

#: The side-car of ``<name>.pt`` is ``<name>`` + this suffix (never ``.pt``: MONAI Label offers ``models/*.pt``).
SIDECAR_SUFFIX = ".architecture.json"

_logger = logging.getLogger("multicure_monai.handlers.checkpoint")

# the ids of the switches in records written before they were grouped (version 0.12.0)
_FLAT_IDS = {
    "use_multicure": "multicure#use",
    "multicure_form": "multicure#form",
    "multicure_level": "multicure#level",
    "predictive_uses_uncertainty": "multicure#in_predictive",
}


def _plain(architecture: Mapping[str, Any]) -> dict[str, Any]:
    """The record by config id, as plain JSON / weights-only-loadable values (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in flatten_ids(architecture).items()}


class ArchitectureRecord:
    """The architecture switches as an object of ignite's ``save_dict`` (it saves ``state_dict()`` under its key).

    Loading is done by :func:`check_architecture` before anything else, so :meth:`load_state_dict` does nothing.

    Args:
        architecture: config id -> value, nested for groups, e.g. ``{"multicure": {"level": 2, "use": True}}``.
    """

    def __init__(self, architecture: Mapping[str, Any]) -> None:
        self.architecture = _plain(architecture)

    def state_dict(self) -> dict[str, Any]:
        """The recorded switches."""
        return dict(self.architecture)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """No-op: the record is compared, not restored (see :func:`check_architecture`)."""


def sidecar_path(path: str | os.PathLike) -> str:
    """The side-car file of a checkpoint: ``models/model.pt`` -> ``models/model.architecture.json``."""
    root, ext = os.path.splitext(os.fspath(path))
    return (root if ext == ".pt" else os.fspath(path)) + SIDECAR_SUFFIX


def _sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_sidecar(path: str | os.PathLike, architecture: Mapping[str, Any]) -> str:
    """Write the side-car of the checkpoint ``path`` (already written): the switches and the file's SHA-256.

    Args:
        path: the checkpoint file it describes.
        architecture: config id -> value, nested for groups.

    Returns:
        The side-car's path (written atomically).
    """
    content = {"architecture": _plain(architecture), "sha256": _sha256(path)}
    text = json.dumps(content, indent=2, sort_keys=True).encode()
    return atomic_write(sidecar_path(path), lambda f: f.write(text))


def read_architecture(path: str | os.PathLike, checkpoint: Any = None) -> dict[str, Any] | None:
    """The switches a checkpoint was written with, or None for a checkpoint without a (matching) record.

    Args:
        path: the checkpoint file.
        checkpoint: its loaded content, if already loaded (a record inside it wins over a side-car).

    Returns:
        config id -> value, or None.
    """
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get(ARCHITECTURE_KEY), Mapping):
        return _current_ids(checkpoint[ARCHITECTURE_KEY])
    side = sidecar_path(path)
    if not os.path.isfile(side):
        return None
    try:
        with open(side) as f:
            content = json.load(f)
        record, digest = content["architecture"], content["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        _logger.warning(f"{side}: unreadable architecture record ({e}); not compared")
        return None
    if digest != _sha256(path):
        _logger.warning(f"{side} describes another version of {os.fspath(path)} (hash differs); not compared")
        return None
    return _current_ids(record)


def _current_ids(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record with the ids of today's configs (a record from before 0.12.0 has flat ids)."""
    return {_FLAT_IDS.get(k, k): v for k, v in _plain(record).items()}


def _flag(value: Any) -> str:
    """A config value as the command line writes it (``True``, ``2``, ``[1,2]``)."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_flag(v) for v in value) + "]"
    return str(value)


def check_architecture(
    path: str | os.PathLike, recorded: Mapping[str, Any] | None, expected: Mapping[str, Any]
) -> None:
    """Compare the recorded switches of a checkpoint with the configured ones; one error naming every mismatch.

    Switches that only one side has are not compared (a record from a later version may hold more).

    Args:
        path: the checkpoint file (named in the message).
        recorded: what the checkpoint was written with, by config id (None: no record, nothing to compare).
        expected: what this run configures (config id -> value, nested for groups).

    Raises:
        BundleInputError: a switch differs; the message lists each with the flag that makes this run match.
    """
    if not recorded:
        return
    expected, recorded = _plain(expected), _current_ids(recorded)
    diffs = [k for k in expected if k in recorded and recorded[k] != expected[k]]
    if not diffs:
        return
    lines = [f"  {k}: the checkpoint has {recorded[k]!r}, this run {expected[k]!r}" for k in diffs]
    flags = " ".join(f"--{k} {_flag(recorded[k])}" for k in diffs)
    raise BundleInputError(
        f"{os.fspath(path)} was trained with other network switches than this run configures:\n"
        + "\n".join(lines)
        + f"\nRun with {flags} (the values it was trained with), or load a checkpoint trained with these switches."
    )


def explain_load_error(
    path: str | os.PathLike, error: Exception, architecture: Mapping[str, Any]
) -> BundleInputError | None:
    """Turn PyTorch's ``size mismatch`` / ``Missing key(s)`` error of a checkpoint without a record into one that
    names the switches to set; None for any other error.

    Args:
        path: the checkpoint file.
        error: what ``load_state_dict`` raised.
        architecture: the architecture switches of the config (their ids are named in the message).
    """
    text = str(error)
    if not isinstance(error, RuntimeError) or not any(
        m in text for m in ("size mismatch", "Missing key(s)", "Unexpected key(s)")
    ):
        return None
    first = next((line.strip() for line in text.splitlines()[1:] if line.strip()), text.splitlines()[0])
    flags = ", ".join(f"--{k}" for k in flatten_ids(architecture))
    return BundleInputError(
        f"{os.fspath(path)} does not fit the networks this run builds ({first[:200]}). The checkpoint records no "
        f"architecture (written before the record existed, or its side-car is missing): run with the switches it "
        f"was trained with ({flags})."
    )
