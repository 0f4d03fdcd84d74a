"""`python -m server.bench <name>`: measured figures for one part of the system.

Each benchmark lives in `bench/<name>.py` with `add_arguments(parser)` and `main(args) -> int`
and is imported only when chosen, so one benchmark's dependencies never load for another. With
`--json`, a benchmark's last line is one JSON object with its figures.
"""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS = {
    "noise": "noise providers: ms per view, peak memory, i.i.d. statistics, cross-view consistency",
    "prior": "prior cost per step: shapes CFG call, SD 2.1-sized UNet CFG call, SD VAE encode fwd+bwd",
    "render": "render and marching tets fwd+bwd per step at 64^2..256^2, grids 32/64; --fit: proof fit",
    "quality": "SDS vs FSD vs CFD on the shapes prior: IoU, colour error, distinct modes, render diversity",
    "step": "one step's time by stage (shapes prior, SD-2.1-sized prior), CFD vs SDS, peak memory, latency",
    "stages": "every stage of the SD profile at full size (random SD 2.1 weights): s/step, shapes, peak RSS",
    "gpu": "on a CUDA machine with no network: every SD stage in fp16 and fp32, ms/step vs the SD FLOP floor",
    "latency": "submission to first preview on a warm server; preview arrival to display in Blender",
    "batch": "jobs per hour of `python -m server batch` with 1 vs 2 Ray workers; Ray's overhead per job",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m server.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    for name, help_text in BENCHMARKS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in BENCHMARKS:
        parser.print_help()
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    module = importlib.import_module(f"bench.{argv[0]}")
    command = argparse.ArgumentParser(prog=f"python -m server.bench {argv[0]}", description=module.__doc__)
    module.add_arguments(command)
    return module.main(command.parse_args(argv[1:]))
