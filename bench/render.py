"""What the geometry side of one optimisation step costs: `python -m server.bench render [--json]`.

Two timings per DMTet grid (Kuhn n = 32, the CPU default of `server.job.spec.JobSpec.grid_resolution`,
n = 64 and threestudio's n = 128, about 275k vertices; `--grids` picks), on a bumpy sphere's SDF with
a fresh texture field, one view:
- render forward + backward at 64^2, 128^2 and 256^2: `render_mesh` (lambertian, texture field) of the
  extracted mesh, then the backward pass to the mesh vertices and the texture field's parameters;
- marching tets forward + backward: mesh extraction and the backward pass to the SDF and deformation.
A step of the generator costs about the sum of the two, plus the prior. Medians of --repeats runs
after one warm-up. With --json the last line is one JSON object: `ms_step_<size>` and
`ms_marching_tets` at the default grid, per-grid detail under "grids".

`python -m server.bench render --vs-threestudio PATH` instead times this project's marching tetrahedra
against threestudio's `MarchingTetrahedraHelper` from a local checkout at PATH, in one run, on the Kuhn
grid of `--vs-grid` cells per axis (64: about 275k vertices, threestudio's "128" tet budget), and
prints the ratio (`bench/threestudio_tets.py`).

`python -m server.bench render --fit` instead runs the photometric proof fit of `server.testing.fit` (red box
and blue sphere) at a bigger setting than the test's, prints IoU and colour error and writes the
target-vs-fit PNG.

Run with OMP_WAIT_POLICY=PASSIVE; --threads sets torch's CPU threads (default 1).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from server.geometry.dmtet import DMTet
from server.geometry.tetgrid import kuhn_grid
from server.geometry.texture_field import TextureField
from server.job.spec import JobSpec
from server.render.cameras import orbit_c2w
from server.testing.fit import box_and_sphere_target, fit_metrics, fit_target, save_comparison

SIZES = (64, 128, 256)
GRIDS = (JobSpec.grid_resolution, 64, 128)


def bumpy_sphere(n: int, device: torch.device) -> DMTet:
    """A DMTet holding a sphere of radius 0.5 with bumps, so the mesh is not an unusually regular one."""
    geometry = DMTet(kuhn_grid(n, radius=1.0), device=device)
    geometry.init_sphere(0.5)
    with torch.no_grad():
        x, y, z = geometry.grid_vertices.unbind(-1)
        geometry.sdf += 0.04 * torch.sin(7 * x) * torch.sin(7 * y) * torch.sin(7 * z)
    return geometry


def median_ms(run: Callable[[], None], device: torch.device, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        run()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def grid_figures(n: int, device: torch.device, repeats: int) -> dict:
    """Render fwd+bwd per image size and marching tets fwd+bwd on grid n, plus the mesh's size."""
    from server.render.mesh import render_mesh

    geometry = bumpy_sphere(n, device)
    texture = TextureField(device=device)
    with torch.no_grad():
        mesh = geometry()
    c2w = torch.from_numpy(orbit_c2w(20.0, 30.0, 2.4)).float()[None].to(device)
    fovy = torch.full((1,), math.radians(40.0), device=device)
    light = torch.nn.functional.normalize(c2w[:, :3, 3], dim=-1)

    def render_step(size: int) -> None:
        vertices = mesh.vertices.detach().requires_grad_(True)
        view = render_mesh(vertices, mesh.faces, c2w, fovy, size, texture, light_dir=light)
        (view.rgb.square().mean() + view.opacity.mean()).backward()

    def marching_step() -> None:
        geometry.zero_grad(set_to_none=True)
        geometry().vertices.square().sum().backward()

    figures = {
        "vertices": len(mesh.vertices),
        "faces": len(mesh.faces),
        "ms_marching_tets": median_ms(marching_step, device, repeats),
    }
    for size in SIZES:
        figures[f"ms_step_{size}"] = median_ms(lambda size=size: render_step(size), device, repeats)
    return figures


def timings(device: torch.device, repeats: int, sizes: tuple[int, ...] = GRIDS) -> dict:
    """Figures per grid in `sizes` (cells per axis); the default grid's are also the headline keys."""
    result = {"device": str(device), "threads": torch.get_num_threads(), "default_grid": GRIDS[0]}
    grids = {}
    print(f"{'grid':>6} {'mesh faces':>10} " + " ".join(f"{f'{s}^2 ms':>10}" for s in SIZES) + "  march ms")
    for n in dict.fromkeys((GRIDS[0], *sizes)):
        figures = grid_figures(n, device, repeats)
        grids[str(n)] = figures
        print(
            f"{n:>6} {figures['faces']:>10} "
            + " ".join(f"{figures[f'ms_step_{s}']:>10.1f}" for s in SIZES)
            + f" {figures['ms_marching_tets']:>9.1f}",
            flush=True,
        )
    result.update({k: v for k, v in grids[str(GRIDS[0])].items() if k.startswith("ms_")})
    result["grids"] = grids
    return result


def proof_fit(args: argparse.Namespace, device: torch.device) -> dict:
    vertices, faces, color_fn = box_and_sphere_target()
    fit = fit_target(vertices, faces, color_fn, args.steps, args.grid, args.size, args.seed, device)
    metrics = fit_metrics(fit, vertices, faces, color_fn)
    png = save_comparison(args.png, fit, vertices, faces, color_fn)
    return {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "grid": args.grid,
        "render_size": args.size,
        "seed": args.seed,
        **metrics.to_dict(),
        "final_loss": fit.losses[-1] if fit.losses else None,
        "seconds": fit.timings["total_s"],
        "ms_per_step": 1000.0 * fit.timings["per_step_s"],
        "png": str(png),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median)")
    parser.add_argument(
        "--grids", default=",".join(map(str, GRIDS)), help="DMTet cells per axis to time, comma-separated"
    )
    parser.add_argument("--fit", action="store_true", help="run the proof fit instead of the timings")
    parser.add_argument(
        "--vs-threestudio",
        type=Path,
        metavar="PATH",
        help="a threestudio checkout: time marching tets against its MarchingTetrahedraHelper instead",
    )
    parser.add_argument("--vs-grid", type=int, default=64, help="--vs-threestudio: Kuhn cells per axis")
    parser.add_argument("--steps", type=int, default=400, help="--fit: optimisation steps")
    parser.add_argument("--grid", type=int, default=32, help="--fit: DMTet cells per axis")
    parser.add_argument("--size", type=int, default=128, help="--fit: render size")
    parser.add_argument("--seed", type=int, default=0, help="--fit: seed")
    parser.add_argument("--png", type=Path, default=Path("outputs/fit_proof.png"), help="--fit: picture")


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.vs_threestudio is not None:
        from bench.threestudio_tets import compare

        try:
            result = compare(args.vs_threestudio, args.vs_grid, args.repeats, device)
        except FileNotFoundError as error:
            print(f"skipped: {error}", file=sys.stderr)
            return 2
        print(
            f"marching tets forward + backward on the Kuhn grid n={result['grid_cells_per_axis']} "
            f"({result['grid_vertices']} vertices, {result['grid_tets']} tets) on {device}, "
            f"{args.threads} thread(s), median of {args.repeats}:\n"
            f"  this project  {result['ms_ours']:>9.1f} ms  {result['faces_ours']} faces\n"
            f"  threestudio   {result['ms_threestudio']:>9.1f} ms  {result['faces_threestudio']} faces\n"
            f"  threestudio / this project: {result['threestudio_over_ours']:.2f}"
        )
        ok = result["faces_ours"] == result["faces_threestudio"]
    elif args.fit:
        result = proof_fit(args, device)
        print(
            f"proof fit on {device}: grid {args.grid}, {args.size}^2 renders, {args.steps} steps in "
            f"{result['seconds']:.1f} s: IoU {result['iou']:.3f}, colour error {result['color_error']:.4f}, "
            f"render error {result['render_error']:.4f}; wrote {result['png']}"
        )
        ok = math.isfinite(result["iou"])
    else:
        print(
            f"render and marching tets, forward + backward, one view, on {device}, {args.threads} thread(s):"
        )
        result = timings(device, args.repeats, tuple(int(n) for n in args.grids.split(",")))
        ok = all(math.isfinite(v) for k, v in result.items() if k.startswith("ms_"))
    if args.json:
        print(json.dumps(result))
    return 0 if ok else 1


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
