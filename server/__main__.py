"""`python -m server <command>`: the generation server's command line.

Each command lives in its own module with `add_arguments(parser)` and `main(args) -> int`, imported
only when chosen, so `--help` and the light commands start without loading torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "ddim-check": ("server.distill.ddim_check", "prove the clean flow equals DDIM sampling (2-D)"),
    "sample": (
        "server.priors.sample",
        "plain DDIM sampling from a prior, to check it loads and follows prompts",
    ),
    "serve": ("server.serve", "run the server Blender talks to (stdin/stdout, or TCP with --listen)"),
    "generate": ("server.pipeline.cli", "run a text-to-3D job headless and write the asset"),
    "batch": ("server.batch.cli", "run prompts x seeds as jobs on Ray, on this machine or a cluster"),
    "texture": ("server.pipeline.texture_cli", "texture an existing mesh headless, keeping it exactly"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        parser.print_help()
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    command = argparse.ArgumentParser(prog=f"python -m server {argv[0]}", description=module.__doc__)
    module.add_arguments(command)
    return module.main(command.parse_args(argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
