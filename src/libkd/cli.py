"""The ``libkd`` command: one registry of subcommands sharing the experiment options.

A subcommand is a function decorated with :func:`command`; its module is listed in
``COMMAND_MODULES`` so that importing the CLI registers it. Shared options (``--config``,
``--set``, ``--seed``, ``--device``, ``--out``) become config overrides.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from libkd import LibkdError, __version__
from libkd.config import ExperimentConfig, load_config

COMMAND_MODULES = ["libkd.commands"]


@dataclass
class Command:
    name: tuple[str, ...]
    help: str
    run: Callable[[argparse.Namespace], int | None]
    arguments: list[tuple[tuple, dict]] = field(default_factory=list)
    uses_config: bool = True


REGISTRY: dict[tuple[str, ...], Command] = {}


def arg(*names: str, **kwargs: Any) -> tuple[tuple, dict]:
    """One argparse argument of a subcommand, as given to :func:`command`."""
    return names, kwargs


def duration(text: str) -> float:
    """Seconds in a wall-clock duration given as 5400, 5400s, 90m, 1.5h or 2h30m (an argparse ``type``)."""
    units, rest, total = {"h": 3600.0, "m": 60.0, "s": 1.0}, text.strip().lower(), 0.0
    if rest.replace(".", "", 1).isdigit():
        rest += "s"
    for unit, factor in units.items():
        number, sep, after = rest.partition(unit)
        if sep:
            try:
                total, rest = total + float(number) * factor, after
            except ValueError:
                rest = "?"
                break
    if rest or not 0 < total < float("inf"):
        raise argparse.ArgumentTypeError(f"'{text}' is not a duration: give seconds or hours/minutes, e.g. 5400, 90m, "
                                         "1.5h or 2h30m (more than zero)")
    return total


def command(name: str, help: str, arguments: list[tuple[tuple, dict]] | None = None, uses_config: bool = True):
    """Register ``fn(args)`` as the subcommand ``name`` (words separated by spaces, e.g. 'data info')."""

    def register(fn: Callable[[argparse.Namespace], int | None]):
        key = tuple(name.split())
        REGISTRY[key] = Command(key, help, fn, arguments or [], uses_config)
        return fn

    return register


def _shared_options() -> argparse.ArgumentParser:
    shared = argparse.ArgumentParser(add_help=False)
    group = shared.add_argument_group("experiment options")
    group.add_argument("--config", "-c", metavar="YAML", help="experiment config (recipes live in configs/)")
    group.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set data.subset=0.1 (repeatable)")
    group.add_argument("--seed", type=int, help="shortcut for --set seed=N")
    group.add_argument("--device", help="shortcut for --set device=DEV (cpu, cuda, cuda:1)")
    group.add_argument("--out", help="shortcut for --set out=DIR (where outputs and the resolved config go)")
    return shared


def build_parser() -> argparse.ArgumentParser:
    for module in COMMAND_MODULES:
        importlib.import_module(module)
    parser = argparse.ArgumentParser(
        prog="libkd",
        description="Train data-efficient ViTs by distilling an ensemble of convolution and involution "
        "teachers from precomputed, augmentation-consistent teacher logits.",
    )
    parser.add_argument("--version", action="version", version=f"libkd {__version__}")
    shared = _shared_options()
    groups: dict[tuple[str, ...], argparse._SubParsersAction] = {(): parser.add_subparsers(dest="command", metavar="COMMAND")}
    parsers: dict[tuple[str, ...], argparse.ArgumentParser] = {}
    for key in sorted(REGISTRY):
        for depth in range(1, len(key)):  # intermediate words ('data' in 'data info') are groups
            prefix = key[:depth]
            if prefix not in parsers:
                group_parser = groups[prefix[:-1]].add_parser(prefix[-1], help=f"{prefix[-1]} commands")
                group_parser.set_defaults(_group=group_parser)
                parsers[prefix] = group_parser
                groups[prefix] = group_parser.add_subparsers(dest="_".join(prefix), metavar="COMMAND")
        cmd = REGISTRY[key]
        sub = groups[key[:-1]].add_parser(key[-1], help=cmd.help, description=cmd.help,
                                          parents=[shared] if cmd.uses_config else [])
        for names, kwargs in cmd.arguments:
            sub.add_argument(*names, **kwargs)
        sub.set_defaults(_command=cmd)
        parsers[key] = sub
    return parser


def experiment_config(args: argparse.Namespace, schema: type = ExperimentConfig) -> Any:
    """The config named by ``--config`` with ``--set`` and the shortcut options applied."""
    overrides = list(args.overrides)
    for key in ("seed", "device", "out"):
        if getattr(args, key, None) is not None:
            overrides.append(f"{key}={getattr(args, key)}")
    return load_config(args.config, overrides, schema)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cmd: Command | None = getattr(args, "_command", None)
    if cmd is None:  # no subcommand, or a group ('libkd store') without one of its commands
        getattr(args, "_group", parser).print_help()
        return 2
    try:
        return int(cmd.run(args) or 0)
    except LibkdError as exc:
        print(f"libkd {' '.join(cmd.name)}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"libkd {' '.join(cmd.name)}: interrupted", file=sys.stderr)
        return 130
