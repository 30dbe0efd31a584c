"""What several subcommands share: the settings flags and their loading with clear errors."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import pydantic
import yaml

from worker.config import Settings, load_settings


class ConfigError(Exception):
    """The configuration cannot be used; the message says why (already formatted)."""


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, help="where blobs, results and exec roots live")
    parser.add_argument("--config", type=Path, help="YAML configuration file")
    add_log_flag(parser)


def add_log_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")


def describe(error: pydantic.ValidationError) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(settings)"
        lines.append(f"  {field}: {item['msg']}")
    return "\n".join(lines)


def settings_from_args(args: argparse.Namespace, **overrides: Any) -> Settings:
    """Settings from --config/--data-dir (and the caller's overrides); ConfigError if invalid."""
    if getattr(args, "data_dir", None) is not None:
        overrides["data_dir"] = args.data_dir
    try:
        return load_settings(getattr(args, "config", None), **overrides)
    except pydantic.ValidationError as error:
        raise ConfigError(f"invalid configuration:\n{describe(error)}") from error
    except (FileNotFoundError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read configuration: {error}") from error


def fail(message: str, code: int = 2) -> int:
    print(f"sidecar-executor: {message}", file=sys.stderr)  # noqa: T201
    return code
