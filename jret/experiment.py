"""Plumbing shared by the experiment scripts: configs, result files, tables.

An experiment takes ``--config configs/<name>.py`` (a Python file whose ``get_config()`` returns an
``ml_collections.ConfigDict``), optional ``--set key.path=value`` overrides and ``--workdir``; it
writes its resolved config, metrics and library versions next to its outputs (DESIGN.md, principle 6).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import platform
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from jret.evaluate import SETUPS


def load_config(
    path: str | os.PathLike, overrides: Sequence[str] = ()
) -> ml_collections.ConfigDict:
    """Import ``path``, call its ``get_config()`` and apply ``key.path=value`` overrides.

    The config's directory is importable while it loads, so a config can build on another.

    Override values are parsed as Python literals when possible (``3``, ``0.5``, ``(1, 2)``,
    ``True``), else kept as strings.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"jret_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path}: defines no get_config()")
    config = module.get_config()
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set: expected key.path=value, got {item!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise ValueError(f"--set: {key!r} is not a field of the config")
        node[leaf] = value
    return config


def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The common command line: ``--config``, ``--workdir``, ``--set`` (repeatable)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="configs/<name>.py with get_config()")
    parser.add_argument(
        "--workdir", default=None, help="output directory (default runs/<config name>)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set extract.max_side=512",
    )
    args = parser.parse_args(argv)
    if args.workdir is None:
        args.workdir = str(Path("runs") / Path(args.config).stem)
    return args


def start(description: str, argv: Sequence[str] | None = None):
    """The common start of an experiment script: parse ``--config/--workdir/--set``, load the
    config with its overrides and create the workdir. Returns ``(config, workdir)``."""
    args = parse_args(description, argv)
    config = load_config(args.config, args.set)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    return config, workdir


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that ran the experiment: ``argv`` when given, else ``sys.argv``."""
    if argv is not None:
        return " ".join(argv)
    return " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])


def versions() -> dict[str, str]:
    """Versions of Python, the platform and the libraries a result depends on."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("jax", "jaxlib", "flax", "optax", "numpy", "scipy"):
        try:
            out[name] = importlib.import_module(name).__version__
        except (ImportError, AttributeError):
            continue
    import jax

    out["devices"] = ", ".join(str(d) for d in jax.devices())
    return out


def provenance(config: ml_collections.ConfigDict, command: str) -> dict[str, Any]:
    """The fields every ``metrics.json`` carries: resolved config, versions and command."""
    return {"config": config.to_dict(), "versions": versions(), "command": command}


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Write ``payload`` as indented JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2, default=_jsonable)
        f.write("\n")
    os.replace(tmp, path)


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, ml_collections.ConfigDict):
        return obj.to_dict()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; floats printed with two decimals."""

    def cell(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def map_rows(results: Mapping[str, Mapping[str, Any]]) -> list[list[Any]]:
    """Rows ``stage, E, M, H`` mAP (in %) and ``M mP@10`` from ``{stage: evaluate_revisited(...)}``."""
    rows = []
    for stage, res in results.items():
        rows.append(
            [stage]
            + [100 * res[s]["map"] for s in ("easy", "medium", "hard")]
            + [100 * res["medium"]["mp@k"][10]]
        )
    return rows


def stage_metrics(results: Mapping[str, Mapping[str, Any]]) -> dict[str, dict]:
    """``{stage: {setup: {"map", "mp@k"}}}`` of ``{stage: evaluate_revisited(...)}`` for JSON."""
    return {
        stage: {s: {"map": r[s]["map"], "mp@k": r[s]["mp@k"]} for s in SETUPS}
        for stage, r in results.items()
    }


MAP_HEADER = ("stage", "mAP E", "mAP M", "mAP H", "mP@10 M")
