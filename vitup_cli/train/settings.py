"""A run's configuration by method: the method's defaults < a ``--config`` file < the flags given, or a
resumed run's own ``config.json`` with operational changes only (``RESUME_MUTABLE``)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from vitup_cli.errors import VitupError
from vitup_cli.train.config import RESUME_MUTABLE, CommonConfig, coerce
from vitup_cli.train.methods import METHODS

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


def config_class(method: str) -> type[CommonConfig]:
    """The configuration dataclass of a training method (``--method``)."""

    if method not in METHODS:
        raise VitupError(f"--method {method}: unknown training method; use one of {', '.join(METHODS)}")
    return METHODS[method].config_class


def read_config_file(path: str | Path, cls: type[CommonConfig] | None = None) -> dict[str, Any]:
    """A YAML (``.yaml``/``.yml``) or TOML (``.toml``) file of settings; a top-level ``train`` table is
    also accepted. Keys are the method's config names (dashes or underscores); a ``method`` key picks
    the method when ``cls`` is not given."""
    data = read_mapping(path)
    if cls is None:
        cls = config_class(str(data.get("method", "vitup")))
    return coerce(data, f"--config {Path(path)}", cls)


def read_mapping(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise VitupError(f"--config {p}: no such file")
    text = p.read_text(encoding="utf-8")
    suffix = p.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix in {".yaml", ".yml"}:
            data = yaml.safe_load(text) or {}
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise VitupError(f"--config {p}: unknown format; use .yaml, .yml, .toml or .json")
    except VitupError:
        raise
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise VitupError(f"--config {p}: cannot parse it ({first})") from None
    if not isinstance(data, dict):
        raise VitupError(f"--config {p}: expected a mapping of settings at the top level")
    if set(data) == {"train"} and isinstance(data["train"], dict):
        data = data["train"]
    if "config" in data and isinstance(data["config"], dict) and "steps" in data["config"]:
        data = data["config"]  # a run's config.json
    return data


def build_config(file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> CommonConfig:
    """Defaults of the method < ``file`` < ``overrides`` (the flags given explicitly). The method is
    ``overrides["method"]``, else the file's ``method``, else ``vitup``."""
    overrides = dict(overrides or {})
    data = read_mapping(file) if file is not None else {}
    method = str(overrides.get("method") or data.get("method") or "vitup")
    cls = config_class(method)
    values: dict[str, Any] = {}
    if file is not None:
        values.update(coerce({k: v for k, v in data.items() if k != "method"}, f"--config {Path(file)}", cls))
    values.update(coerce(overrides, "option", cls))
    values["method"] = method
    return cls(**values)


def resume_config(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> CommonConfig:
    """The configuration of an existing run, with operational ``overrides`` only."""
    run = Path(run_dir)
    path = run / "config.json"
    if not path.is_file():
        raise VitupError(f"--resume {run}: no {path.name} there; pass the --out folder of a `vitup train` run")
    try:
        saved = json.loads(path.read_text())["config"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise VitupError(f"--resume {run}: {path.name} is damaged ({exc})") from None
    cls = config_class(str(saved.get("method", "vitup")))
    cfg = cls(**coerce(saved, str(path), cls))
    changed = {}
    overrides = dict(overrides or {})
    if overrides.get("method", cfg.method) != cfg.method:
        raise VitupError(
            f"--resume {run}: the run was trained with --method {cfg.method}, not {overrides['method']}; "
            "start a new --out to train another method"
        )
    overrides.pop("method", None)
    for key, value in coerce(overrides, "option", cls).items():
        if key == "out":
            continue
        if getattr(cfg, key) == value:
            continue
        if key not in RESUME_MUTABLE:
            raise VitupError(
                f"--resume {run}: --{key.replace('_', '-')} differs from the run's ({getattr(cfg, key)!r}); "
                f"a resumed run keeps its settings (only {', '.join(sorted(RESUME_MUTABLE))} may change). "
                "Start a new --out to change it"
            )
        changed[key] = value
    return replace(cfg, out=str(run), **changed)
