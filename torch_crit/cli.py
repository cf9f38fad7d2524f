"""Command line: ``torch-crit critical | validate | demo``."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

# sub-command name -> (module, help). Each module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
_COMMANDS = {
    "critical": ("torch_crit.theory.cli_critical", "print critical points of activations"),
    "validate": ("torch_crit.validate", "ensemble validation of the finite-width theory"),
    "demo": ("torch_crit.demo", "train deep MLPs three ways and write a report"),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torch-crit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (mod_name, help_) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        p.set_defaults(_module=mod_name)
        try:
            importlib.import_module(mod_name).add_arguments(p)
        except ModuleNotFoundError:
            p.set_defaults(_missing=True)
    args = parser.parse_args(argv)
    if getattr(args, "_missing", False):
        parser.error(f"the '{args.command}' command is not available in this build")
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
