"""Do CFD's and FSD's fixed noises give more diverse 3-D results than SDS, and as faithful ones?

`python -m server.bench quality [--json]` runs the real generator (`server.pipeline.run.run_job`) on the
shipped shapes prior, whose answers are known exactly (`server.shapes.primitives`), for a fixed set of
prompts, seeds and methods at equal step budgets, and scores each result:

- fidelity, for prompts that name a shape: volumetric IoU of the generated solid against the true
  primitive on a lattice over the DMTet box; for prompts that name a colour: the colour error, i.e.
  the area-weighted mean |texture - true colour| per channel over the generated surface (the texture
  field queried at the mesh vertices, as the final preview carries it; the job is stopped before its
  final bake and GLB export, which would only add time);
- diversity, for open prompts ("a shape", "a red shape", "a cube"): how many distinct (shape, colour)
  outcomes the seeds reach, each result judged on 32 px renders from four views by the shapes judge
  (`server.shapes.classify`, majority vote), and the mean pairwise RMS distance between the results'
  renders; plus how often the outcome still fits the prompt, since junk is diverse too.

Writes one PNG per open prompt (rows: methods, columns: seeds, each cell a result seen from two views
with its judged outcome underneath) into --out. With --json the last line is one JSON object: per
method `iou_mean`, `colour_error_mean`, `distinct_modes_mean`, `render_distance_mean` and
`prompt_following`, then every prompt's figures and every run's.

Shape and colour accuracy (`shape_accuracy`, `colour_accuracy` per method): every primitive named
with a colour ("a red cube", colours cycling through all eight), `--shape-seeds` seeds from 100
(never used in tuning), each run through the whole product path to its GLB, and the GLB alone
judged against the true primitives (`server.shapes.solid`). `--judge-assets DIR` re-judges the
assets an earlier run wrote instead of generating.

Texture only (`texture_only` per method, CFD and SDS by default): the artist's-mesh path
(`server.pipeline.texture.run_texture_job`) on a sphere, a cube and a torus mesh (`texture_meshes`),
each prompted in all eight colours, `--texture-seeds` seeds from 100 per prompt at `--texture-steps`,
and the colour judged from the GLB's baked texture (`judge_texture_colour`): colour accuracy and
seconds per asset.

The default: 2 specific and 3 open prompts, seeds 0-7, plus 5 primitives x 4 seeds, for 3 methods,
at the job's default steps (600), over two worker processes of one thread each: 180 runs, about
three hours on 2 cores; the shape-accuracy part alone (`--specific "" --open ""`) about 42 minutes
for two methods.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import math
import os
import platform
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import date
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import scipy.spatial
import torch
import trimesh
from PIL import Image, ImageDraw
from tqdm import tqdm

from server.geometry.mesh_sdf import lattice_inside
from server.geometry.tetgrid import lattice_vertices
from server.job.errors import Cancelled, ShapeVanishedError
from server.job.events import Events
from server.job.fixed_mesh import FixedMesh
from server.job.spec import JobSpec
from server.pipeline.run import run_job
from server.pipeline.texture import run_texture_job
from server.priors import SHAPES_WEIGHTS
from server.render.cameras import orbit_c2w
from server.render.mesh import render_mesh
from server.shapes.classify import judge
from server.shapes.primitives import COLOURS, SHAPES, inside, parse_caption
from server.shapes.solid import judge_colour, judge_solid, solid_ious, surface_error, true_primitive_mesh

SPECIFIC_PROMPTS = ("a red cube", "a blue sphere")
OPEN_PROMPTS = ("a shape", "a red shape", "a cube")
METHODS = ("sds", "fsd", "cfd")
JUDGE_VIEWS = ((20.0, -45.0), (20.0, 45.0), (20.0, 135.0), (20.0, -135.0))  # (elevation, azimuth) degrees
JUDGE_SIZE = 32  # the shapes prior's (and its judge's) image size
DISTANCE_SIZE = 64
GRID_VIEWS = 2  # of JUDGE_VIEWS, side by side in a grid cell
IOU_LATTICE = 64
TEXTURE_METHODS = ("cfd", "sds")
TEXTURE_SHAPES = ("sphere", "cube", "torus")
TEXTURE_STEPS = 60  # gave the named colour in 24 of 24 tuning runs (seed 2), 23 of 24 at 40 steps
SHAPE_SEED_OFFSET = 100  # the shape-accuracy runs use seeds 100, 101, ...: none was used in tuning
SHAPE_IOU_FLOOR = 0.65  # a verdict also needs this IoU: a perfect flat disc scores 0.61 as a torus


@dataclass
class Run:
    """One generated result and its scores; iou / colour_error are None where the prompt leaves them open."""

    prompt: str
    method: str
    seed: int
    seconds: float
    iou: float | None
    colour_error: float | None
    shape: str  # the judge's verdict
    colour: str
    follows_prompt: bool


@dataclass
class Mesh:
    vertices: np.ndarray  # [N, 3] float32
    faces: np.ndarray  # [F, 3] int32
    colours: np.ndarray  # [N, 3] float in [0, 1]: the texture field at the vertices


class FinalMesh(Events):
    """Keeps the preview run_job sends after its last step; the job is then cancelled before its export."""

    def __init__(self) -> None:
        self.mesh: Mesh | None = None

    def preview_mesh(
        self, step: int, positions: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None
    ) -> None:
        self.mesh = Mesh(positions, faces, colors.astype(np.float64) / 255.0)


def generate(spec: JobSpec) -> Mesh:
    """The mesh and vertex colours run_job ends its optimisation with (no export, no files written)."""
    events = FinalMesh()
    with contextlib.suppress(Cancelled):
        run_job(spec, None, events, lambda: events.mesh is not None)
    if events.mesh is None:
        raise RuntimeError(f"run_job finished {spec.prompt!r} without a final preview")
    return events.mesh


# ------------------------------------------------------------------------------------------ fidelity


def volumetric_iou(vertices: np.ndarray, faces: np.ndarray, shape: str, n: int = IOU_LATTICE) -> float:
    """IoU of a closed mesh's solid and the true primitive's, on the (n+1)^3 lattice over [-1, 1]^3."""
    mesh_inside = lattice_inside(vertices, faces, n, 1.0)
    true_inside = inside(shape, lattice_vertices(n))
    union = np.count_nonzero(mesh_inside | true_inside)
    return float(np.count_nonzero(mesh_inside & true_inside) / union) if union else 1.0


def colour_error(mesh: Mesh, colour: str) -> float:
    """Mean |colour - true colour| per channel over the surface, faces weighted by area."""
    surface = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    face_colours = mesh.colours[mesh.faces].mean(axis=1)
    error = np.abs(face_colours - np.asarray(COLOURS[colour])).mean(axis=1)
    return float(np.average(error, weights=surface.area_faces)) if surface.area > 0 else 1.0


# ----------------------------------------------------------------------------------------- diversity


def render_views(mesh: Mesh, size: int) -> np.ndarray:
    """[len(JUDGE_VIEWS), size, size, 3] lambertian renders in [0, 1], lit from above each camera.

    Colours are the nearest vertex's: at these sizes a pixel covers several vertices anyway.
    """
    tree = scipy.spatial.cKDTree(mesh.vertices)
    colours = torch.from_numpy(mesh.colours).float()

    def colour_fn(points: torch.Tensor) -> torch.Tensor:
        return colours[tree.query(points.detach().numpy())[1]]

    c2w = torch.stack([torch.from_numpy(orbit_c2w(e, a, 2.4)).float() for e, a in JUDGE_VIEWS])
    fovy = torch.full((len(JUDGE_VIEWS),), math.radians(40.0))
    light = torch.nn.functional.normalize(c2w[:, :3, 3] + torch.tensor([0.0, 0.0, 1.5]), dim=-1)
    vertices, faces = torch.from_numpy(mesh.vertices).float(), torch.from_numpy(mesh.faces).long()
    with torch.no_grad():
        view = render_mesh(vertices, faces, c2w, fovy, size, color_fn=colour_fn, light_dir=light)
    return view.rgb.numpy().astype(np.float64)


def judge_outcome(views: np.ndarray) -> tuple[str, str]:
    """(shape, colour) of one result: the judge's most frequent verdict over its views."""
    verdicts = judge(views)
    shape = Counter(v.shape for v in verdicts).most_common(1)[0][0]
    colour = Counter(v.colour for v in verdicts).most_common(1)[0][0]
    return shape, colour


def distinct_modes(outcomes: list[tuple[str, str]]) -> int:
    return len(set(outcomes))


def mean_pairwise_distance(renders: list[np.ndarray]) -> float:
    """Mean over pairs of results of the RMS difference of their renders (same views, same size)."""
    flat = np.stack([r.reshape(-1) for r in renders])
    if len(flat) < 2:
        return 0.0
    return float(np.mean(scipy.spatial.distance.pdist(flat) / math.sqrt(flat.shape[1])))


def follows(prompt: str, outcome: tuple[str, str]) -> bool:
    """Whether a judged outcome is one of the prompt's right answers (open parts accept anything)."""
    colour, shape = parse_caption(prompt)
    return (shape is None or outcome[0] == shape) and (colour is None or outcome[1] == colour)


# ------------------------------------------------------------------------------------------- pictures


def save_grid(path: Path, prompt: str, cells: dict[tuple[str, int], np.ndarray], verdicts: dict) -> None:
    """Rows: methods; columns: seeds; each cell the first GRID_VIEWS views with the verdict below."""
    methods = list(dict.fromkeys(m for m, _ in cells))
    seeds = list(dict.fromkeys(s for _, s in cells))
    size = next(iter(cells.values())).shape[1]
    scale, label, caption, pad = 2, 48, 14, 4
    cell_w, cell_h = GRID_VIEWS * size * scale, size * scale + caption
    canvas = Image.new(
        "RGB", (label + len(seeds) * (cell_w + pad), 20 + len(methods) * (cell_h + pad)), (255, 255, 255)
    )
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 4), prompt, fill=(0, 0, 0))
    for column, seed in enumerate(seeds):
        draw.text((label + column * (cell_w + pad) + cell_w // 2 - 16, 4), f"seed {seed}", fill=(0, 0, 0))
    for row, method in enumerate(methods):
        top = 20 + row * (cell_h + pad)
        draw.text((pad, top + size), method.upper(), fill=(0, 0, 0))
        for column, seed in enumerate(seeds):
            left = label + column * (cell_w + pad)
            strip = np.concatenate(list(cells[method, seed][:GRID_VIEWS]), axis=1)
            image = Image.fromarray((strip.clip(0, 1) * 255).round().astype(np.uint8))
            canvas.paste(image.resize((cell_w, size * scale), Image.NEAREST), (left, top))
            draw.text(
                (left + 2, top + size * scale + 1), " ".join(verdicts[method, seed][::-1]), fill=(0, 0, 0)
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


# ------------------------------------------------------------------------------------ shape accuracy


@dataclass
class AssetRun:
    """One full job on "a <colour> <shape>", judged from the GLB it wrote, as a user would get it."""

    prompt: str
    method: str
    seed: int
    seconds: float
    shape: str  # the primitive the GLB's solid is closest to; VANISHED when the job left no shape
    iou: float  # its IoU against the named primitive
    colour: str  # the named colour covering most of the textured surface
    shape_right: bool  # the named primitive, with IoU >= SHAPE_IOU_FLOOR
    colour_right: bool
    surface_error: float | None  # mean distance from the named primitive's surface / its size
    preview_png: str  # "" when there is no asset


VANISHED = "vanished"


def shape_prompts(seeds: int, first_seed: int = SHAPE_SEED_OFFSET) -> list[tuple[str, int]]:
    """Every primitive with `seeds` seeds; the colours cycle so every colour appears."""
    colours = list(COLOURS)
    return [
        (f"a {colours[(index * seeds + k) % len(colours)]} {shape}", first_seed + k)
        for index, shape in enumerate(SHAPES)
        for k in range(seeds)
    ]


def load_glb_z_up(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vertices in the server's Z-up frame, faces, vertex colours in [0, 1] sampled from the texture)."""
    mesh = trimesh.load(path, force="mesh")
    y_up = np.asarray(mesh.vertices, dtype=np.float64)
    vertices = np.stack([y_up[:, 0], -y_up[:, 2], y_up[:, 1]], axis=1)  # glTF +Y up -> +Z up
    colours = mesh.visual.to_color().vertex_colors[:, :3] / 255.0
    return vertices, np.asarray(mesh.faces), colours


def one_asset(job: dict) -> AssetRun:
    """Run one job to its GLB (the product's whole path: optimise, bake, export) and judge the file.
    A job with "from_truth" starts from the true primitive its prompt names instead of the sphere: a
    pipeline that cannot keep the right answer cannot find it."""
    job = dict(job)
    start = None
    if job.pop("from_truth", False):
        mesh = true_primitive_mesh(parse_caption(job["prompt"])[1])
        start = (np.asarray(mesh.vertices, dtype=np.float32), np.asarray(mesh.faces, dtype=np.int64))
    started = time.perf_counter()
    try:
        result = run_job(JobSpec.from_dict(job), start, Events(), lambda: False, init_fill=None)
    except ShapeVanishedError:  # the user gets nothing: wrong in shape and colour; the bench goes on
        seconds = round(time.perf_counter() - started, 2)
        prompt, method, seed = job["prompt"], job["method"], job["seed"]
        return AssetRun(prompt, method, seed, seconds, VANISHED, 0.0, VANISHED, False, False, None, "")
    return judge_asset(job, result.glb, result.seconds, result.preview_png)


def judge_asset(job: dict, glb: Path, seconds: float, preview_png: Path) -> AssetRun:
    """Judge a written asset against the primitive and colour its job's prompt names."""
    vertices, faces, colours = load_glb_z_up(glb)
    colour, shape = parse_caption(job["prompt"])
    verdict, _ = judge_solid(vertices, faces)
    iou = solid_ious(vertices, faces)[shape]
    judged_colour = judge_colour(vertices, faces, colours)
    return AssetRun(
        job["prompt"],
        job["method"],
        job["seed"],
        round(seconds, 2),
        verdict,
        round(iou, 4),
        judged_colour,
        verdict == shape and iou >= SHAPE_IOU_FLOOR,
        judged_colour == colour,
        round(surface_error(vertices, shape), 4),
        str(preview_png),
    )


def judge_folder(folder: Path) -> list[AssetRun]:
    """Judge every asset a previous run wrote into `folder` (each asset's job.json names its job)."""
    assets = []
    for job_json in sorted(folder.glob("*/job.json")):
        record = json.loads(job_json.read_text())
        glb = job_json.parent / record["files"]["glb"]
        assets.append(judge_asset(record["job"], glb, record["seconds"], job_json.parent / "preview.png"))
    return assets


# ------------------------------------------------------------------------------------ texture only


@dataclass
class TextureRun:
    """One texture job on an artist's mesh, judged from the GLB it wrote."""

    prompt: str
    method: str
    seed: int
    seconds: float
    colour: str  # the named colour covering most of the baked surface
    colour_right: bool


@functools.lru_cache(maxsize=1)
def texture_meshes() -> dict[str, FixedMesh]:
    """A sphere, a cube and a torus as an artist would model them (finely enough tessellated for the
    judge's per-vertex texture samples), placed and sized unlike the primitives the prior knows."""
    cube = trimesh.creation.box((2.0, 2.0, 2.0))
    for _ in range(3):
        cube = cube.subdivide()
    meshes = {
        "sphere": trimesh.creation.icosphere(3, radius=1.5),
        "cube": cube,
        "torus": trimesh.creation.torus(2.0, 0.8, 48, 16),
    }
    offset = np.float32([4.0, -1.0, 0.5])
    return {
        name: FixedMesh.from_arrays(np.asarray(mesh.vertices, np.float32) + offset, np.asarray(mesh.faces))
        for name, mesh in meshes.items()
    }


def judge_texture_colour(glb: Path) -> str:
    """The named colour covering most of an asset's surface, read from its baked texture: each face
    votes with its area for the colour nearest its texture colour at its corners' UVs."""
    return judge_colour(*load_glb_z_up(glb))


def texture_prompts(seeds: int, first_seed: int = SHAPE_SEED_OFFSET) -> list[tuple[str, int]]:
    """Every texture mesh in every colour, each prompt with its own `seeds` seeds (never tuned on)."""
    prompts = [f"a {colour} {shape}" for shape in TEXTURE_SHAPES for colour in COLOURS]
    return [(prompt, first_seed + i * seeds + k) for i, prompt in enumerate(prompts) for k in range(seeds)]


def one_texture(job: dict) -> TextureRun:
    """Texture the mesh the prompt names and judge the GLB."""
    mesh = texture_meshes()[parse_caption(job["prompt"])[1]]
    result = run_texture_job(JobSpec.from_dict(job), mesh, Events(), lambda: False)
    colour = judge_texture_colour(result.glb)
    return TextureRun(
        job["prompt"],
        job["method"],
        job["seed"],
        round(result.seconds, 2),
        colour,
        colour == parse_caption(job["prompt"])[0],
    )


def summarise_textures(runs: list[TextureRun], methods: list[str]) -> dict[str, dict]:
    return {
        method: {
            "colour_accuracy": _mean([float(r.colour_right) for r in runs if r.method == method]),
            "seconds_mean": _mean([r.seconds for r in runs if r.method == method]),
            "runs": sum(r.method == method for r in runs),
        }
        for method in methods
    }


def summarise_assets(assets: list[AssetRun], methods: list[str]) -> dict[str, dict]:
    """Per method: shape and colour accuracy over every run, and per primitive."""
    summary = {}
    for method in methods:
        group = [a for a in assets if a.method == method]
        per_shape = {
            shape: _mean([float(a.shape_right) for a in group if parse_caption(a.prompt)[1] == shape])
            for shape in SHAPES
        }
        summary[method] = {
            "shape_accuracy": _mean([float(a.shape_right) for a in group]),
            "colour_accuracy": _mean([float(a.colour_right) for a in group]),
            "shape_iou_mean": _mean([a.iou for a in group]),
            "surface_error_mean": _mean([a.surface_error for a in group if a.surface_error is not None]),
            "vanished": sum(a.shape == VANISHED for a in group),
            "shape_accuracy_per_shape": per_shape,
            "seconds_mean": _mean([a.seconds for a in group]),
        }
    return summary


def save_asset_grid(path: Path, assets: list[AssetRun], methods: list[str]) -> None:
    """Rows: primitive x method; columns: seeds; each cell two views of the asset's preview, with the
    verdict (judged shape and colour) underneath."""
    seeds = sorted({a.seed for a in assets})
    by_key = {(parse_caption(a.prompt)[1], a.method, a.seed): a for a in assets}
    cell_w, cell_h, label, caption = 256, 128, 150, 14
    rows = [(shape, method) for shape in SHAPES for method in methods]
    canvas = Image.new("RGB", (label + cell_w * len(seeds), 20 + (cell_h + caption) * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for column, seed in enumerate(seeds):
        draw.text((label + column * cell_w + cell_w // 2 - 20, 4), f"seed {seed}", fill=(0, 0, 0))
    for row, (shape, method) in enumerate(rows):
        top = 20 + row * (cell_h + caption)
        draw.text((4, top + cell_h // 2), f"{shape} / {method.upper()}", fill=(0, 0, 0))
        for column, seed in enumerate(seeds):
            asset = by_key.get((shape, method, seed))
            if asset is None:
                continue
            if asset.preview_png:
                with Image.open(asset.preview_png) as preview:
                    two_views = preview.convert("RGB").crop((0, 0, preview.width // 2, preview.height))
                    canvas.paste(two_views.resize((cell_w, cell_h)), (label + column * cell_w, top))
            mark = "ok" if asset.shape_right and asset.colour_right else "x"
            text = f"{asset.prompt[2:]}: {asset.colour} {asset.shape} {asset.iou:.2f} {mark}"
            draw.text((label + column * cell_w + 2, top + cell_h), text, fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


# ------------------------------------------------------------------------------------------ the bench


def score(prompt: str, mesh: Mesh) -> tuple[float | None, float | None, tuple[str, str], np.ndarray]:
    """(IoU or None, colour error or None, judged outcome, renders for the distance and the grid)."""
    colour, shape = parse_caption(prompt)
    iou = volumetric_iou(mesh.vertices, mesh.faces, shape) if shape else None
    error = colour_error(mesh, colour) if colour else None
    outcome = judge_outcome(render_views(mesh, JUDGE_SIZE))
    return iou, error, outcome, render_views(mesh, DISTANCE_SIZE)


def one_run(job: dict) -> tuple[Run, np.ndarray]:
    """Generate and score one job (prompt, method, seed and settings): a worker process's unit of work."""
    start = time.perf_counter()
    mesh = generate(JobSpec.from_dict(job))
    seconds = time.perf_counter() - start
    prompt, method, seed = job["prompt"], job["method"], job["seed"]
    iou, error, outcome, views = score(prompt, mesh)
    return Run(prompt, method, seed, seconds, iou, error, *outcome, follows(prompt, outcome)), views


def summarise(runs: list[Run], renders: dict, open_prompts: list[str], methods: list[str]) -> dict:
    """Per method: fidelity over the specific prompts, diversity over the open ones; and per prompt."""
    per_prompt: dict[str, dict] = {}
    for prompt, method in itertools.product(dict.fromkeys(r.prompt for r in runs), methods):
        group = [r for r in runs if r.prompt == prompt and r.method == method]
        ious = [r.iou for r in group if r.iou is not None]
        errors = [r.colour_error for r in group if r.colour_error is not None]
        per_prompt.setdefault(prompt, {})[method] = {
            "iou_mean": _mean(ious),
            "colour_error_mean": _mean(errors),
            "distinct_modes": distinct_modes([(r.shape, r.colour) for r in group]),
            "render_distance": mean_pairwise_distance([renders[prompt, method, r.seed] for r in group]),
            "prompt_following": _mean([float(r.follows_prompt) for r in group]),
            "outcomes": dict(Counter(f"{r.colour} {r.shape}" for r in group).most_common()),
            "seconds_mean": _mean([r.seconds for r in group]),
        }
    summary = {}
    for method in methods:
        specific = [per_prompt[p][method] for p in per_prompt if p not in open_prompts]
        opened = [per_prompt[p][method] for p in per_prompt if p in open_prompts]
        summary[method] = {
            "iou_mean": _mean([f["iou_mean"] for f in specific if f["iou_mean"] is not None]),
            "colour_error_mean": _mean(
                [f["colour_error_mean"] for f in specific if f["colour_error_mean"] is not None]
            ),
            "distinct_modes_mean": _mean([f["distinct_modes"] for f in opened]),
            "render_distance_mean": _mean([f["render_distance"] for f in opened]),
            "prompt_following": _mean([f["prompt_following"] for f in specific + opened]),
        }
    return {"methods": summary, "prompts": per_prompt}


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 4) if values else None


def print_tables(result: dict, methods: list[str]) -> None:
    def cell(value: float | None) -> str:
        return f"{'-' if value is None else f'{value:.3f}':>10}"

    keys = (
        "iou_mean",
        "colour_error_mean",
        "distinct_modes_mean",
        "render_distance_mean",
        "prompt_following",
    )
    print(f"\n{'per method':<24}" + "".join(f"{m:>10}" for m in methods))
    for key in keys:
        print(f"{key:<24}" + "".join(cell(result["methods"][m][key]) for m in methods))
    print(
        f"\n{'prompt':<14}{'method':<8}{'IoU':>8}{'colour err':>11}{'modes':>7}{'dist':>7}{'follow':>8}"
        "  outcomes"
    )
    for prompt, by_method in result["prompts"].items():
        for method, f in by_method.items():
            iou = "-" if f["iou_mean"] is None else f"{f['iou_mean']:.3f}"
            err = "-" if f["colour_error_mean"] is None else f"{f['colour_error_mean']:.3f}"
            outcomes = ", ".join(f"{k} x{v}" for k, v in f["outcomes"].items())
            print(
                f"{prompt:<14}{method:<8}{iou:>8}{err:>11}{f['distinct_modes']:>7}"
                f"{f['render_distance']:>7.3f}{f['prompt_following']:>8.2f}  {outcomes}"
            )


def print_asset_table(result: dict, methods: list[str]) -> None:
    keys = ("shape_accuracy", "colour_accuracy", "shape_iou_mean", "surface_error_mean", "seconds_mean")
    print(f"\n{'judged from the GLB':<24}" + "".join(f"{m:>10}" for m in methods))
    for key in keys:
        figures = [result["methods"][m][key] for m in methods]
        print(f"{key:<24}" + "".join("-".rjust(10) if f is None else f"{f:>10.3f}" for f in figures))
    print(f"{'vanished':<24}" + "".join(f"{result['methods'][m]['vanished']:>10}" for m in methods))
    for shape in SHAPES:
        figures = [result["methods"][m]["shape_accuracy_per_shape"][shape] for m in methods]
        print(f"{'  ' + shape:<24}" + "".join("-".rjust(10) if f is None else f"{f:>10.2f}" for f in figures))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    parser.add_argument("--specific", default=",".join(SPECIFIC_PROMPTS), help="comma-separated prompts")
    parser.add_argument("--open", default=",".join(OPEN_PROMPTS), help="comma-separated open prompts")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", type=int, default=8, help="seeds 0..N-1 per prompt and method")
    parser.add_argument(
        "--steps", type=int, default=JobSpec.steps, help="optimisation steps per run (all methods)"
    )
    parser.add_argument("--grid-resolution", type=int, default=JobSpec.grid_resolution)
    parser.add_argument("--render-size", type=int, default=JobSpec.render_size)
    parser.add_argument(
        "--shape-seeds",
        type=int,
        default=4,
        help="seeds per primitive for shape and colour accuracy, judged from the GLBs; 0: skip",
    )
    parser.add_argument(
        "--shape-first-seed",
        type=int,
        default=SHAPE_SEED_OFFSET,
        help="the first of those seeds (the default was never used in tuning)",
    )
    parser.add_argument(
        "--from-truth",
        action="store_true",
        help="start every shape-accuracy job from the true primitive (at its size) instead of the sphere: "
        "how much of the right answer the pipeline keeps",
    )
    parser.add_argument(
        "--judge-assets",
        type=Path,
        default=None,
        help="judge the assets an earlier run wrote into this folder instead of generating (e.g. after a "
        "change of the judge)",
    )
    parser.add_argument(
        "--texture-seeds", type=int, default=1, help="seeds per texture-only prompt (24 prompts); 0: skip"
    )
    parser.add_argument("--texture-steps", type=int, default=TEXTURE_STEPS)
    parser.add_argument("--texture-methods", default=",".join(TEXTURE_METHODS))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker")
    parser.add_argument(
        "--workers", type=int, default=min(2, os.cpu_count() or 1), help="runs in parallel, one process each"
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/quality"), help="folder for the PNGs")


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    specific = [p.strip() for p in args.specific.split(",") if p.strip()]
    open_prompts = [p.strip() for p in args.open.split(",") if p.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    seeds = list(range(args.seeds))
    start = time.perf_counter()
    training = json.loads((SHAPES_WEIGHTS / "training.json").read_text())  # what the workers will load
    runs: list[Run] = []
    renders: dict[tuple[str, str, int], np.ndarray] = {}
    settings = {"steps": args.steps, "grid_resolution": args.grid_resolution, "render_size": args.render_size}
    jobs = [
        {"prompt": prompt, "method": method, "seed": seed, **settings, "device": "cpu"}
        for prompt, method, seed in itertools.product(specific + open_prompts, methods, seeds)
    ]
    asset_jobs = [
        {"prompt": prompt, "method": method, "seed": seed, **settings, "device": "cpu"}
        | {"output_dir": str(args.out / "assets")}
        | ({"from_truth": True} if args.from_truth else {})
        for (prompt, seed), method in itertools.product(
            shape_prompts(args.shape_seeds, args.shape_first_seed), methods
        )
    ]
    texture_methods = [m.strip() for m in args.texture_methods.split(",") if m.strip()]
    texture_jobs = [
        {"prompt": prompt, "method": method, "seed": seed, "kind": "texture", "steps": args.texture_steps}
        | {"render_size": args.render_size, "device": "cpu", "output_dir": str(args.out / "textures")}
        for (prompt, seed), method in itertools.product(texture_prompts(args.texture_seeds), texture_methods)
    ]
    assets: list[AssetRun] = []
    textures: list[TextureRun] = []
    if args.judge_assets is not None:
        jobs, asset_jobs, texture_jobs = [], [], []
        assets = judge_folder(args.judge_assets)
        methods = [m for m in methods if any(a.method == m for a in assets)]
    bar = tqdm(
        total=len(jobs) + len(asset_jobs) + len(texture_jobs),
        desc="quality",
        unit="run",
        file=sys.stderr,
        dynamic_ncols=True,
    )
    # Every run is seeded, so the workers change the wall time, never the figures.
    workers = ProcessPoolExecutor(  # spawned, not forked: safe beside torch's threads, and as on Windows
        args.workers,
        mp_context=get_context("spawn"),
        initializer=torch.set_num_threads,
        initargs=(args.threads,),
    )
    with workers as pool:
        for run, views in pool.map(one_run, jobs):
            runs.append(run)
            renders[run.prompt, run.method, run.seed] = views
            bar.set_postfix_str(f"{run.prompt} / {run.method} / seed {run.seed}")
            bar.update()
        for asset in pool.map(one_asset, asset_jobs):
            assets.append(asset)
            bar.set_postfix_str(f"{asset.prompt} / {asset.method} / seed {asset.seed}")
            bar.update()
        for texture in pool.map(one_texture, texture_jobs):
            textures.append(texture)
            bar.set_postfix_str(f"texture {texture.prompt} / {texture.method} / seed {texture.seed}")
            bar.update()
    bar.close()

    result = summarise(runs, renders, open_prompts, methods)
    if assets:
        for method, figures in summarise_assets(assets, methods).items():
            result["methods"][method].update(figures)
        save_asset_grid(args.out / "quality_shapes.png", assets, methods)
    pngs = {}
    for prompt in open_prompts:
        path = args.out / f"quality_{prompt.replace(' ', '_')}.png"
        cells = {(m, s): renders[prompt, m, s] for m, s in itertools.product(methods, seeds)}
        verdicts = {(r.method, r.seed): (r.shape, r.colour) for r in runs if r.prompt == prompt}
        save_grid(path, prompt, cells, verdicts)
        pngs[prompt] = str(path)
    print_tables(result, methods)
    if assets:
        print_asset_table(result, methods)
    if textures:
        result["texture_only"] = summarise_textures(textures, texture_methods)
        print(f"\n{'texture only':<24}" + "".join(f"{m:>10}" for m in texture_methods))
        for key in ("colour_accuracy", "seconds_mean"):
            figures = [result["texture_only"][m][key] for m in texture_methods]
            print(f"{key:<24}" + "".join(f"{f:>10.3f}" for f in figures))
    seconds = time.perf_counter() - start
    print(
        f"\n{len(runs)} runs of {args.steps} steps in {seconds / 60:.1f} min; "
        f"grids: {', '.join(pngs.values())}"
    )
    if args.json:
        record = {
            "date": date.today().isoformat(),
            "machine": {
                "cpus": os.cpu_count(),
                "processor": platform.processor() or platform.machine(),
                "threads": args.threads,
                "torch": torch.__version__,
            },
            "command": "python -m server.bench " + " ".join(sys.argv[1:]),
            "prior_training_steps": training.get("steps"),
            "settings": {
                "workers": args.workers,
                "steps": args.steps,
                "seeds": args.seeds,
                "grid_resolution": args.grid_resolution,
                "render_size": args.render_size,
                "specific": specific,
                "open": open_prompts,
                "shape_seeds": args.shape_seeds,
                "from_truth": args.from_truth,
                "shape_first_seed": args.shape_first_seed,
                "shape_iou_floor": SHAPE_IOU_FLOOR,
                "texture_seeds": args.texture_seeds,
                "texture_steps": args.texture_steps,
            },
            "seconds": round(seconds, 1),
            **result,
            "pngs": pngs,
            "runs": [asdict(r) for r in runs],
            "assets": [asdict(a) for a in assets],
            "textures": [asdict(t) for t in textures],
        }
        print(json.dumps(record))
    return 0
