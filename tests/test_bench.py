"""The benchmarks measure what they say: scores against known answers, the timed step against run_job's,
and the JSON each command ends with, on tiny configurations (no timing assertions)."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pytest
import torch
import trimesh

from bench import latency, quality, step
from server.job.errors import Cancelled
from server.job.events import Events
from server.job.spec import JobSpec
from server.pipeline.run import run_job
from server.pipeline.setup import start_job
from server.pipeline.step import optimisation_step
from server.shapes.classify import foreground, judge, mask_ious
from server.shapes.dataset import build_dataset
from server.shapes.primitives import COLOURS, CUBE_HALF, SHAPES, SPHERE_RADIUS

TINY = {"steps": 4, "grid_resolution": 12, "render_size": 32, "device": "cpu"}


def coloured(mesh: trimesh.Trimesh, rgb: tuple[float, float, float]) -> quality.Mesh:
    colours = np.tile(np.asarray(rgb, dtype=np.float64), (len(mesh.vertices), 1))
    return quality.Mesh(mesh.vertices.astype(np.float32), mesh.faces.astype(np.int32), colours)


def cube(shift: float = 0.0) -> trimesh.Trimesh:
    box = trimesh.creation.box(extents=(2 * CUBE_HALF,) * 3)
    box.apply_translation((shift, 0.0, 0.0))
    return box


def parse(args: list[str], module) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(args)


def last_json_line(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- scores


def test_iou_is_one_for_the_primitive_and_the_overlap_for_a_shifted_box():
    assert quality.volumetric_iou(cube().vertices, cube().faces, "cube") == 1.0
    shift = 0.125  # four lattice cells: the lattice count is exact for this box
    expected = (2 * CUBE_HALF - shift) / (2 * CUBE_HALF + shift)
    shifted = cube(shift)
    assert quality.volumetric_iou(shifted.vertices, shifted.faces, "cube") == pytest.approx(
        expected, abs=2e-3
    )
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=SPHERE_RADIUS)
    assert quality.volumetric_iou(sphere.vertices, sphere.faces, "sphere") > 0.97
    assert quality.volumetric_iou(sphere.vertices, sphere.faces, "torus") < 0.3


def test_colour_error_is_the_mean_channel_distance_to_the_true_colour():
    assert quality.colour_error(coloured(cube(), COLOURS["red"]), "red") == pytest.approx(0.0, abs=1e-12)
    saturated = coloured(cube(), (1.0, 0.0, 0.0))  # what an over-guided texture field gives
    assert quality.colour_error(saturated, "red") == pytest.approx((0.14 + 0.12 + 0.10) / 3)


def test_the_judge_names_rendered_primitives_and_modes_are_counted():
    red_cube = quality.judge_outcome(quality.render_views(coloured(cube(), COLOURS["red"]), 32))
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=SPHERE_RADIUS)
    blue_sphere = quality.judge_outcome(quality.render_views(coloured(sphere, COLOURS["blue"]), 32))
    assert (red_cube, blue_sphere) == (("cube", "red"), ("sphere", "blue"))
    outcomes = [red_cube, blue_sphere, red_cube, ("cube", "blue")]
    assert quality.distinct_modes(outcomes) == 3
    assert quality.follows("a red shape", red_cube) and not quality.follows("a red shape", blue_sphere)
    assert quality.follows("a cube", ("cube", "blue")) and quality.follows("a shape", blue_sphere)
    assert not quality.follows("a blue sphere", ("cube", "blue"))


def test_the_judge_measures_foreground_against_each_images_own_background():
    data = build_dataset(40, 32, seed=7)
    images = data.images / 255.0
    background = np.all(data.images == data.images[:, :1, :1], axis=-1)  # the corner's colour
    tinted = np.where(background[..., None], np.array([0.87, 0.85, 0.81]), images)
    right = [
        (v.shape, v.colour) == (SHAPES[s], list(COLOURS)[c])
        for v, s, c in zip(judge(tinted), data.shape_ids, data.colour_ids, strict=True)
    ]
    # A greyish background (as some diffusion samples have) is no foreground: a fixed-white
    # threshold judged every tinted sample a full-frame cube.
    assert np.mean(right) >= 0.9
    assert foreground(tinted).mean() < 0.5


def test_mask_iou_is_the_overlap_of_two_silhouettes_over_their_union():
    rng = np.random.default_rng(0)
    a, b = rng.random((3, 8, 8)) < 0.4, rng.random((2, 8, 8)) < 0.6
    ious = mask_ious(a, b)
    for i, j in np.ndindex(3, 2):
        assert ious[i, j] == pytest.approx((a[i] & b[j]).sum() / (a[i] | b[j]).sum())
    assert np.allclose(np.diagonal(mask_ious(a, a)), 1.0)
    empty = np.zeros((1, 8, 8), bool)
    assert mask_ious(empty, empty)[0, 0] == 0.0 and mask_ious(a[:1], empty)[0, 0] == 0.0


def test_an_object_covering_most_of_the_border_is_measured_against_white():
    image = np.ones((1, 32, 32, 3))
    image[:, :, 6:26] = COLOURS["red"]  # 20 of 32 columns: the border's median is red
    mask = foreground(image)[0]
    assert mask[:, 6:26].all() and not mask[:, :6].any() and not mask[:, 26:].any()
    assert judge(image)[0].colour == "red"


def test_render_distance_is_zero_for_equal_results_and_rms_otherwise():
    black, white = np.zeros((4, 8, 8, 3)), np.ones((4, 8, 8, 3))
    assert quality.mean_pairwise_distance([black, black, black]) == 0.0
    # pairs: (black, black) 0, (black, white) 1, (black, white) 1
    assert quality.mean_pairwise_distance([black, black, white]) == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------------------- the step


class EveryStep(Events):
    """run_job's events with a preview after every step: the mesh before the step, colours after it."""

    def __init__(self):
        self.meshes: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def preview_due(self) -> bool:
        return True

    def preview_mesh(self, step, positions, faces, colors=None) -> None:
        self.meshes.append((positions, faces, colors))


@pytest.mark.parametrize("method", ["cfd", "sds"])
def test_the_timed_step_makes_run_jobs_updates(method):
    """Four steps (the geometry freezes before the last): the stage timer's gradient hooks leave the
    meshes and colours exactly run_job's."""
    spec = JobSpec.from_dict({"prompt": "a red cube", "method": method, "seed": 5, **TINY})
    events = EveryStep()
    with pytest.raises(Cancelled):  # after the last step, before the export
        run_job(spec, None, events, lambda: len(events.meshes) == spec.steps)

    state = start_job(spec, None)
    timer = step.StageTimer(torch.device("cpu"))
    for k, (positions, faces, colours) in enumerate(events.meshes):
        with torch.no_grad():
            mesh = state.geometry()
        optimisation_step(state, k, timer)
        with torch.no_grad():
            ours = (state.texture(mesh.vertices) * 255).round().to(torch.uint8).numpy()
        np.testing.assert_array_equal(mesh.faces.numpy(), faces)
        np.testing.assert_array_equal(mesh.vertices.numpy(), positions)
        np.testing.assert_array_equal(ours, colours)
    assert len(events.meshes) == spec.steps
    first, last = events.meshes[0][0], events.meshes[-1][0]
    assert first.shape != last.shape or not np.allclose(first, last), "the geometry moved"
    assert set(timer.wall) >= {"render", "noise", "network", "render_backward", "optimiser"}


# ------------------------------------------------------------------------------------------- commands


def test_quality_ends_with_the_figures_per_method_and_draws_a_grid(tmp_path, capsys):
    def bench(workers: int) -> dict:
        quick = ("--seeds", "2", "--steps", "2", "--grid-resolution", "8", "--workers", str(workers))
        quick = (*quick, "--shape-seeds", "0", "--texture-seeds", "0")
        args = parse(
            [
                *("--specific", "a red cube", "--open", "a shape", "--methods", "sds,cfd", *quick),
                *("--out", str(tmp_path / str(workers)), "--json"),
            ],
            quality,
        )
        assert quality.main(args) == 0
        return last_json_line(capsys.readouterr().out)

    result = bench(2)
    for method in ("sds", "cfd"):
        figures = result["methods"][method]
        assert 0.0 <= figures["iou_mean"] <= 1.0 and 0.0 <= figures["colour_error_mean"] <= 1.0
        assert 1 <= figures["distinct_modes_mean"] <= 2
    assert len(result["runs"]) == 8 and result["prior_training_steps"] > 0
    assert (tmp_path / "2" / "quality_a_shape.png").is_file()

    def scores(record: dict) -> list[dict]:
        return [{k: v for k, v in run.items() if k != "seconds"} for run in record["runs"]]

    assert scores(bench(1)) == scores(result)  # seeded runs: workers change the time, not the figures


def test_a_shape_that_vanishes_counts_as_wrong_and_the_bench_goes_on(tmp_path, monkeypatch, capsys):
    """A vanished pink cone ended a 40-run accuracy bench with the error, and its figures with it; the
    table of a run that has no job of some primitive (a stopped run re-judged) shows a dash there."""
    from PIL import Image

    from server.job.errors import ShapeVanishedError

    def vanish(*args, **kwargs):
        raise ShapeVanishedError("the shape vanished at step 360: nothing is left to render")

    monkeypatch.setattr(quality, "run_job", vanish)
    gone = quality.one_asset({"prompt": "a pink cone", "method": "cfd", "seed": 103})
    assert (gone.shape, gone.shape_right, gone.colour_right, gone.preview_png) == (
        "vanished",
        False,
        False,
        "",
    )
    Image.new("RGB", (512, 128), "white").save(tmp_path / "preview.png")
    kept = quality.AssetRun(
        "a red cone", "cfd", 100, 9.0, "cone", 0.8, "red", True, True, 0.02, str(tmp_path / "preview.png")
    )
    summary = quality.summarise_assets([gone, kept], ["cfd"])["cfd"]
    assert summary["shape_accuracy"] == 0.5 and summary["colour_accuracy"] == 0.5 and summary["vanished"] == 1
    assert summary["surface_error_mean"] == 0.02 and summary["shape_accuracy_per_shape"]["cone"] == 0.5
    quality.save_asset_grid(tmp_path / "grid.png", [gone, kept], ["cfd"])
    assert Image.open(tmp_path / "grid.png").size[0] > 256
    capsys.readouterr()
    quality.print_asset_table({"methods": {"cfd": summary}}, ["cfd"])
    lines = capsys.readouterr().out.splitlines()
    rows = dict(line.split(maxsplit=1) for line in lines if line.startswith("  "))
    assert rows["cone"].strip() == "0.50" and rows["torus"].strip() == "-"


def test_texture_only_runs_are_judged_from_their_glbs_and_summarised(tmp_path):
    prompts = quality.texture_prompts(1)
    assert len(prompts) == 24 and {seed for _, seed in prompts} == set(range(100, 124))
    job = {"prompt": "a blue torus", "method": "cfd", "seed": 100, "kind": "texture", "steps": 2}
    job |= {"texture_size": 128, "device": "cpu", "output_dir": str(tmp_path)}
    run = quality.one_texture(job)
    assert run.colour in quality.COLOURS and run.colour_right == (run.colour == "blue") and run.seconds > 0
    right = quality.TextureRun("a red cube", "sds", 1, 3.0, "red", True)
    summary = quality.summarise_textures([run, right], ["cfd", "sds"])
    assert summary["sds"] == {"colour_accuracy": 1.0, "seconds_mean": 3.0, "runs": 1}
    assert summary["cfd"]["runs"] == 1


def test_step_ends_with_both_priors_figures(monkeypatch, capsys):
    from server.testing.tiny import tiny_unet, tiny_vae

    monkeypatch.setattr(step, "sd21_unet_config", lambda: tiny_unet(4, 8).config)
    monkeypatch.setattr(step, "sd_vae_config", lambda: tiny_vae().config)
    args = parse(
        [
            "--methods",
            "sds,cfd",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--sd-steps",
            "1",
            "--no-latency",
            "--json",
        ],
        step,
    )
    assert step.main(args) == 0
    result = last_json_line(capsys.readouterr().out)
    for prior in ("shapes_volume", "shapes", "sd21"):
        entry = result[prior]
        assert entry["ms_step"] > 0 and entry["ms_network"] > 0 and 0 < entry["non_network_share"] < 1
        assert set(entry["methods"]) == {"sds", "cfd"}
    assert result["sd21"]["network_stages"] == ["network", "encode", "encode_backward"]
    assert (result["shapes_volume"]["stage"], result["shapes"]["stage"]) == ("volume", "mesh")
    volume, mesh = result["shapes_volume"], result["shapes"]
    assert volume["share_of_job_steps"] + mesh["share_of_job_steps"] == pytest.approx(1.0)
    # the job's ratio lies between its stages' ratios, weighted by their shares of the steps
    low, high = sorted([result["cfd_over_sds_volume"], result["cfd_over_sds_mesh"]])
    assert low - 1e-3 <= result["cfd_over_sds"] <= high + 1e-3
    assert result["peak_memory_mb"] > 0


def test_latency_against_a_real_server_and_the_extensions_pump():
    result = latency.measure_latency(repeats=1, threads=1, previews=1)
    server, blender = result["server"], result["blender"]
    assert server["first_preview_ms"] > server["accepted_ms"] > 0
    if "note" not in blender:
        assert blender["previews_timed"] == 1 and blender["preview_vertices"] > 0
        assert blender["arrival_to_display_ms"] >= 0 and "mesh_new_topology" in blender["pump_ms"]
        dense = blender["pump_ms_50k"]
        assert dense["vertices"] == 50_002 and dense["new_topology"] > 0 and dense["in_place"] > 0


def test_the_dense_preview_is_a_closed_outward_ball():
    positions, faces = latency.ball()
    mesh = trimesh.Trimesh(positions, faces, process=False)
    assert len(positions) == 50_002 and mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.volume == pytest.approx(4 / 3 * np.pi, rel=1e-3)


STAND_IN_ISOSURFACE = '''
import numpy as np
import torch
import torch.nn as nn

import threestudio
from threestudio.models.mesh import Mesh
from threestudio.utils.typing import *

from server.geometry.dmtet import DMTet
from server.geometry.tetgrid import TetGrid, kuhn_grid


class MarchingTetrahedraHelper(nn.Module):
    """Stands in for threestudio's: its constructor, its imports, its sign convention (positive inside)."""

    def __init__(self, resolution: int, tets_path: str):
        super().__init__()
        tets = np.load(tets_path)
        grid = kuhn_grid(resolution)
        assert np.array_equal(tets["indices"], grid.tets)
        self.grid_vertices: Float[Tensor, "Nv 3"] = torch.from_numpy(tets["vertices"]).float()
        self.geometry = DMTet(grid, device=torch.device("cpu"))
        threestudio.warn("loaded")

    def forward(self, level: Float[Tensor, "N 1"], deformation: Optional[Tensor] = None) -> Mesh:
        with torch.no_grad():
            self.geometry.sdf.copy_(-level.reshape(-1))
        mesh = self.geometry()
        return Mesh(v_pos=mesh.vertices, t_pos_idx=mesh.faces, grid_level=level)
'''


def test_the_threestudio_comparison_loads_the_helper_from_a_file_and_times_the_same_surface(tmp_path):
    from bench.threestudio_tets import compare, isosurface_file

    with pytest.raises(FileNotFoundError, match="threestudio checkout"):
        isosurface_file(tmp_path)
    models = tmp_path / "threestudio" / "models"
    models.mkdir(parents=True)
    (models / "isosurface.py").write_text(STAND_IN_ISOSURFACE)
    result = compare(tmp_path, 8, 2, torch.device("cpu"))
    assert result["faces_ours"] == result["faces_threestudio"] > 100
    assert result["grid_vertices"] == 9**3 and result["ms_ours"] > 0 and result["ms_threestudio"] > 0
    ratio = result["ms_threestudio"] / result["ms_ours"]
    assert result["threestudio_over_ours"] == pytest.approx(ratio, 0.01)
    assert "threestudio" not in sys.modules  # the stand-ins for its imports are gone again


@pytest.mark.parametrize("shape", SHAPES)
def test_a_job_from_the_truth_starts_as_the_true_primitive_at_its_size(shape):
    """`--from-truth` measures how much of the right answer the pipeline keeps: its start must be the
    named primitive (judged so, IoU > 0.9 on the job's grid) at its true size, not fitted to the box."""
    true = quality.true_primitive_mesh(shape)
    vertices, faces = np.asarray(true.vertices, np.float32), np.asarray(true.faces)
    spec = JobSpec.from_dict({"prompt": f"a red {shape}", "steps": 4, "grid_resolution": 32, "device": "cpu"})
    mesh = start_job(spec, (vertices, faces), init_fill=None).geometry()
    start = mesh.vertices.detach().numpy().astype(np.float64)
    verdict, _ = quality.judge_solid(start, mesh.faces.numpy())
    assert verdict == shape
    assert quality.solid_ious(start, mesh.faces.numpy())[shape] > 0.9
    true_extent = vertices.max(0) - vertices.min(0)
    assert np.abs((start.max(0) - start.min(0)) - true_extent).max() < 2.0 / 32  # within a grid cell
    fitted = start_job(spec, (vertices, faces)).geometry().vertices.detach().numpy()
    assert (fitted.max(0) - fitted.min(0)).max() > 1.5  # an artist's mesh is still fitted to the box
