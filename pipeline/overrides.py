"""From a YAML file and ``--set key.path=value`` overrides to the plain tree that ``pipeline/config.py`` validates.

Nothing here knows the config's fields: a file is read with ``yaml.safe_load`` (never executing code), overrides are
parsed as YAML scalars and written into the tree, and every problem is one ``ConfigError`` line naming the file
(line and column) or the override.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config that cannot run: unknown key, wrong type, value out of range, a file or override that is not YAML."""


def read_tree(path: str | Path | None, overrides: Sequence[str] = (), base: dict | None = None) -> dict:
    """``base`` (copied), updated by the YAML mapping in ``path``, then each override applied in order."""
    tree: dict = copy.deepcopy(base or {})  # overrides edit nested sections in place; the caller's base stays as is
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} not found") from exc
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            hint = "; quote strings holding { } [ ] , or : inside [...]" if "flow" in str(exc) else ""
            raise ConfigError(f"{where}: not valid YAML: {_yaml_problem(exc)}{hint}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping")
        tree.update(loaded or {})
    for assignment in overrides:
        apply_override(tree, assignment)
    return tree


def apply_override(tree: dict, assignment: str) -> None:
    """``a.b.c=value`` into a nested dict; the value is parsed as YAML (``5``, ``0.1``, ``[a, b]``, ``true``).

    A number steps into a list (``ladder.1.model=x``); the entry must already exist.
    """
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key.path=value")
    path, raw = assignment.split("=", 1)
    path = path.strip()
    keys = path.split(".")
    node: dict | list = tree
    for depth, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            child = node[_list_index(node, key, path, ".".join(keys[:depth]))]
        else:
            child = node.setdefault(key, {})
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"--set {path}: {key} is not a section")
        node = child
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"--set {path}: the value {raw!r} is not valid YAML ({_yaml_problem(exc)}); "
            "quote strings holding { } [ ] , : or #, e.g. data.labeled=['/d/x-{0..3}.tar']"
        ) from exc
    if isinstance(node, list):
        node[_list_index(node, keys[-1], path, ".".join(keys[:-1]))] = value
    else:
        node[keys[-1]] = value


def _list_index(items: list, key: str, path: str, where: str) -> int:
    """``key`` as an index of the list at ``where``, or a ``ConfigError`` saying which indices exist."""
    valid = f"indices 0..{len(items) - 1}" if items else "it is empty"
    if not key.isdigit():
        raise ConfigError(f"--set {path}: {where} is a list ({valid}); put an entry index before {key!r}")
    if int(key) >= len(items):
        raise ConfigError(
            f"--set {path}: {where} has no entry {key} ({valid}); "
            f"add the entry in the config file or set the whole list ({where}=[...])"
        )
    return int(key)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's problem in one line, without its multi-line location excerpt."""
    context, problem = getattr(exc, "context", None), getattr(exc, "problem", None)
    if problem is None:
        return str(exc).splitlines()[0]
    return f"{context}: {problem}" if context else problem
