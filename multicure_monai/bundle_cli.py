"""The bundle's command line: a user error printed last, and unknown overrides refused before any work.

``python -m monai.bundle run training|evaluating|inference --config_file ...`` is MONAI's command (``fire``
calls :func:`monai.bundle.scripts.run`, which lets every exception propagate). An error raised inside a config
expression reaches the user wrapped in ``RuntimeError: Failed to evaluate ConfigExpression`` under some fifty
lines of traceback. Importing this module (the bundle configs list it under ``imports``) installs a
:data:`sys.excepthook` that prints a :class:`~multicure_monai.errors.BundleInputError` found anywhere in the
exception chain as the last lines, without the traceback; the process still exits with status 1.
``MULTICURE_DEBUG=1`` or the config id ``debug: true`` keeps the full traceback.

:func:`check_command_line` (the configs' ``checks#command_line``, first in ``initialize``) refuses a
command-line key that no config file defines, e.g. ``--multicure#us False`` or ``--use_multicure False`` (a
switch of the ``multicure`` group is ``--multicure#use``): ``monai.bundle`` would add it as a new, unused id
and train with the default. MONAI hands the overrides to the workflow as ``fire`` keyword arguments and
keeps no record of which ids they added, so the check reads ``sys.argv`` the way ``fire`` does; it runs only
when the process is ``python -m monai.bundle`` (not in MONAI Label or a Python session calling the workflow).
"""

from __future__ import annotations

import ast
import difflib
import inspect
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

from multicure_monai.errors import BundleInputError, find_bundle_input_error

__all__ = [
    "DEBUG_ENV",
    "install_excepthook",
    "set_debug",
    "is_bundle_command",
    "parse_command_line",
    "check_overrides",
    "check_command_line",
]

DEBUG_ENV = "MULTICURE_DEBUG"
_DEBUG_HINT = f"(full traceback: {DEBUG_ENV}=1 or --debug True)"
_state: dict[str, Any] = {"debug": False, "previous_hook": None}


def set_debug(debug: bool) -> None:
    """Keep (``True``) or drop (``False``) the traceback of a :class:`BundleInputError` at exit."""
    _state["debug"] = bool(debug)


def _debug() -> bool:
    return _state["debug"] or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _excepthook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    """Print the chain's :class:`BundleInputError` alone, last; anything else goes to the previous hook."""
    error = find_bundle_input_error(exc)
    previous = _state["previous_hook"] or sys.__excepthook__
    if error is None or _debug():
        previous(exc_type, exc, tb)
        return
    sys.stderr.flush()
    print(f"\nThe run stopped on a problem in its input {_DEBUG_HINT}:", file=sys.stderr)
    print(f"{type(error).__name__}: {error}", file=sys.stderr, flush=True)


def install_excepthook() -> None:
    """Install the hook once per process, chaining to the hook that was there before."""
    if sys.excepthook is not _excepthook:
        _state["previous_hook"] = sys.excepthook
        sys.excepthook = _excepthook


def is_bundle_command() -> bool:
    """Whether this process is ``python -m monai.bundle ...`` (also under ``torchrun``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) == "monai.bundle.__main__"


def _is_flag(token: str) -> bool:
    """``fire``'s rule: a token starting with a hyphen that is not a negative number."""
    if not token.startswith("-") or token in ("-", "--"):
        return False
    try:
        float(token)
        return False
    except ValueError:
        return True


def _literal(value: str) -> Any:
    """A command-line value as ``fire`` reads it: a Python literal if it parses, else the string."""
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def parse_command_line(argv: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Split ``monai.bundle``'s arguments into MONAI's own run arguments and the config overrides.

    Args:
        argv: the arguments after the program, e.g. ``["run", "training", "--config_file", "a.yaml",
            "--max_iterations", "10"]``.

    Returns:
        ``(run_args, override_ids)``: the values of MONAI's run arguments (``config_file``, ``args_file``,
        ``tracking``, ...) and the ids of the other ``--key`` flags, in command-line order (``fire``'s
        spelling: leading hyphens dropped, other hyphens read as underscores, ``::`` as ``#``).
    """
    names = _run_argument_names()
    run_args: dict[str, Any] = {}
    overrides: list[str] = []
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if token == "--":  # fire's own flags follow
            break
        if not _is_flag(token):
            continue
        key, has_value, value = token.lstrip("-").partition("=")
        key = key.replace("-", "_").replace("::", "#")
        if not has_value and i < len(tokens) and not _is_flag(tokens[i]) and tokens[i] != "--":
            value, i = tokens[i], i + 1
        if key in names:
            run_args[key] = _literal(value)
        elif key:
            overrides.append(key)
    return run_args, overrides


def _run_argument_names() -> set[str]:
    """The keyword arguments ``monai.bundle run`` consumes itself (not config ids), read from MONAI's signatures."""
    from monai.bundle import ConfigWorkflow
    from monai.bundle.scripts import create_workflow, run

    names: set[str] = set()
    for fn in (run, create_workflow, ConfigWorkflow.__init__):
        names.update(
            n for n, p in inspect.signature(fn).parameters.items()
            if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        )  # fmt: skip
    return names


def _config_ids(config: Any, prefix: str = "") -> Iterator[str]:
    """Every id of a config, nested ones joined by ``#`` (list items by index)."""
    items: Any = ()
    if isinstance(config, Mapping):
        items = config.items()
    elif isinstance(config, list):
        items = enumerate(config)
    for key, value in items:
        key_id = f"{prefix}#{key}" if prefix else str(key)
        yield key_id
        yield from _config_ids(value, key_id)


def _tracking_ids(tracking: Any) -> set[str]:
    """The ids ``--tracking`` adds to the config (``tracking_uri``, ``experiment_name``, ``run_name``, ...)."""
    from monai.bundle import ConfigParser
    from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS

    if tracking is None:
        return set()
    if isinstance(tracking, str) and tracking in DEFAULT_EXP_MGMT_SETTINGS:
        settings = DEFAULT_EXP_MGMT_SETTINGS[tracking]
    elif isinstance(tracking, Mapping):
        settings = tracking
    else:
        settings = ConfigParser.load_config_files(tracking)
    return set(_config_ids(settings.get("configs", {})))


def check_overrides(
    argv: Sequence[str], allowed_new_ids: Sequence[str] = (), allow_id: str = "allowed_new_ids"
) -> bool:
    """Raise one :class:`BundleInputError` naming every override that no config file defines.

    The known ids are those of the ``--config_file`` files (merged as MONAI merges them), of the
    ``--tracking`` settings, and the metadata (``_meta_``); keys of an ``--args_file`` count as overrides too.
    Each unknown id gets a "did you mean" from the known ids (:func:`difflib.get_close_matches`).

    Args:
        argv: the arguments after the program (see :func:`parse_command_line`).
        allowed_new_ids: ids meant to be new; an id also allows the ids nested under it (``id#...``).
        allow_id: the config id that holds ``allowed_new_ids``, named in the message.

    Returns:
        ``True`` when every override is known (or there is no ``--config_file`` to compare with).
    """
    from monai.bundle import ConfigParser

    run_args, overrides = parse_command_line(argv)
    if run_args.get("args_file"):
        from_file = ConfigParser.load_config_file(run_args["args_file"])
        names = _run_argument_names()
        overrides += [k.replace("::", "#") for k in from_file if k not in names]
        run_args = {**{k: v for k, v in from_file.items() if k in names}, **run_args}
    config_file = run_args.get("config_file")
    if not config_file:
        return True
    config = ConfigParser.load_config_files(config_file)
    known = set(_config_ids(config)) | _tracking_ids(run_args.get("tracking"))
    allowed = [str(a).replace("::", "#") for a in allowed_new_ids or ()]
    unknown = [
        key for key in dict.fromkeys(overrides)
        if key not in known and not key.startswith("_meta_")
        and not any(key == a or key.startswith(a + "#") for a in allowed)
    ]  # fmt: skip
    if not unknown:
        return True
    problems = []
    for key in unknown:
        close = _suggestions(key, known, set(_setting_ids(config)))
        hint = f"; did you mean {' or '.join('--' + c for c in close)}?" if close else ""
        problems.append(f"--{key}: no config id {key!r} in {_names(config_file)}{hint}")
    what = "overrides (MONAI would add them as new, unused config ids)" if len(problems) > 1 else (
        "override (MONAI would add it as a new, unused config id)"
    )
    allow_id = allow_id.replace("::", "#")  # MONAI's parser writes a config value's "#" as "::"
    fix = f"Fix the spelling, or list the ids meant to be new: --{allow_id} \"{[*allowed, *unknown]}\""
    raise BundleInputError(f"unknown command-line {what}:\n  " + "\n  ".join(problems) + "\n" + fix)


def _words(config_id: str) -> frozenset[str]:
    return frozenset(config_id.replace("#", "_").split("_"))


def _setting_ids(config: Any, prefix: str = "") -> Iterator[str]:
    """The ids of a config's settings: values of the top level or of a group, not arguments of a component
    (a mapping with ``_target_``) nor list items."""
    if not isinstance(config, Mapping) or "_target_" in config:
        return
    for key, value in config.items():
        key_id = f"{prefix}#{key}" if prefix else str(key)
        yield key_id
        yield from _setting_ids(value, key_id)


def _suggestions(key: str, known: set[str], settings: set[str], n: int = 3) -> list[str]:
    """Known ids a mistyped ``key`` may mean: first the settings with its name or its words in another group
    (``teacher`` or ``use_multicure`` for ``unlabelled#teacher`` or ``multicure#use``), then close spellings
    (:func:`difflib.get_close_matches`) among the names of its group, or else among the ids at its depth."""
    name, words = key.rpartition("#")[2], _words(key)
    regrouped = sorted(
        (k for k in settings if k != key and (k.rpartition("#")[2] == name or _words(k) == words)),
        key=lambda k: (k.count("#"), k),
    )
    parent = key.rpartition("#")[0]
    if parent in known:  # a misspelt name in a known group: compare with its siblings' names
        siblings = {k.rpartition("#")[2]: k for k in known if k.rpartition("#")[0] == parent}
        close = [siblings[c] for c in difflib.get_close_matches(name, sorted(siblings), n=n, cutoff=0.6)]
    else:
        same_depth = sorted(k for k in known if k.count("#") == key.count("#"))
        close = difflib.get_close_matches(key, same_depth, n=n, cutoff=0.6)
    return list(dict.fromkeys(regrouped + close))[:n]


def _names(config_file: Any) -> str:
    files = [config_file] if isinstance(config_file, (str, os.PathLike)) else list(config_file)
    return ", ".join(os.path.basename(os.fspath(f)) for f in files)


def check_command_line(
    debug: bool = False, allowed_new_ids: Sequence[str] = (), allow_id: str = "allowed_new_ids"
) -> bool:
    """The bundle's first ``initialize`` step: set the debug switch, then check the overrides (command line only).

    Args:
        debug: keep the full traceback of a :class:`BundleInputError` (the config id ``debug``).
        allowed_new_ids: override ids meant to be new.
        allow_id: the config id that holds ``allowed_new_ids`` (the bundle's ``checks#allowed_new_ids``).

    Returns:
        ``True``; raises :class:`BundleInputError` for unknown overrides.
    """
    set_debug(debug)
    if is_bundle_command():
        check_overrides(sys.argv[1:], allowed_new_ids, allow_id)
    return True


install_excepthook()
