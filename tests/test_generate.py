"""The real generator: determinism, outputs on disk, and the whole job through a real server process.

Short jobs on the shipped shapes prior (a few steps on a coarse grid): what is checked is that the
loop, the streaming, the export and the protocol work together, not how good the asset is (that
is the quality benchmark's job).
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from server.job.errors import Cancelled
from server.job.events import Events
from server.job.spec import JobSpec
from server.wire.client import ConnectionClosed, ServerProcess

REPO = Path(__file__).resolve().parent.parent
FINAL = {"done", "cancelled", "error"}
QUICK = {"steps": 6, "grid_resolution": 12, "texture_size": 128, "render_size": 32, "preview_max_fps": 30}


class Recorder(Events):
    """Collects what a job reports, as the server's JobEvents would send it."""

    def __init__(self):
        self.updates, self.meshes, self.textures, self.texture_steps = [], [], [], []

    def progress(self, *args, **kwargs):
        self.updates.append(args)

    def preview_due(self):
        return True

    def preview_mesh(self, step, positions, faces, colors=None):
        self.meshes.append((positions.copy(), faces.copy(), colors.copy()))

    def texture(self, step, png, width, height, final=False):
        self.textures.append((png, width, height, final))
        self.texture_steps.append(step)


def run(tmp_path: Path, seed: int, **settings):
    from server.pipeline.run import run_job

    spec = JobSpec.from_dict(
        {"prompt": "a red cube", "seed": seed, "output_dir": str(tmp_path), **QUICK, **settings}
    )
    events = Recorder()
    return run_job(spec, None, events, lambda: False), events


def test_same_seed_same_asset_and_a_new_seed_a_new_one(tmp_path: Path):
    first, events = run(tmp_path / "a", seed=3)
    again, _ = run(tmp_path / "b", seed=3)
    other, _ = run(tmp_path / "c", seed=4)
    load = lambda r: trimesh.load(r.glb, force="mesh")  # noqa: E731
    np.testing.assert_array_equal(load(first).vertices, load(again).vertices)
    assert events.meshes, "previews were streamed"
    final_preview = events.meshes[-1][0]
    other_vertices = trimesh.load(other.glb, force="mesh").vertices
    assert load(first).vertices.shape != other_vertices.shape or not np.allclose(
        load(first).vertices, other_vertices
    )
    assert final_preview.dtype == np.float32 and events.meshes[-1][2].dtype == np.uint8


def test_outputs_are_complete_and_self_describing(tmp_path: Path):
    result, events = run(tmp_path, seed=0)
    assert result.out_dir.parent == tmp_path and not list(tmp_path.glob(".*partial"))
    mesh = trimesh.load(result.glb, force="mesh")
    assert len(mesh.faces) > 0 and mesh.visual.material.baseColorTexture is not None
    record = json.loads(result.job_json.read_text())
    assert record["seed"] == 0 and record["job"]["prompt"] == "a red cube"
    assert JobSpec.from_dict({k: v for k, v in record["job"].items()}).steps == QUICK["steps"]
    preview = Image.open(result.preview_png)
    assert preview.width > preview.height  # several views side by side
    png, width, height, final = events.textures[-1]
    assert final and Image.open(io.BytesIO(png)).size == (width, height) == (128, 128)
    # Milestone textures from the geometry's freeze on (step 4 of 6), then the asset's own.
    assert events.texture_steps == [4, 5, 6] and [t[3] for t in events.textures] == [False, False, True]
    assert all(Image.open(io.BytesIO(t[0])).size == (128, 128) for t in events.textures)
    steps = [p[0] for p in events.updates]
    assert steps == list(range(1, QUICK["steps"] + 1))


def test_texture_milestones_start_at_the_geometry_freeze_and_spread_over_the_colour_phase():
    from server.pipeline.setup import texture_milestones

    assert texture_milestones(300, 400) == {300, 333, 366}
    assert texture_milestones(4, 6) == {4, 5}
    assert texture_milestones(0, 1) == set() and texture_milestones(5, 5) == set()
    assert all(300 <= m < 400 for m in texture_milestones(300, 400))


def test_cancel_stops_within_a_step(tmp_path: Path):
    from server.pipeline.run import run_job

    spec = JobSpec.from_dict({"prompt": "a cube", "output_dir": str(tmp_path), **QUICK, "steps": 500})
    events = Recorder()
    with pytest.raises(Cancelled) as caught:
        run_job(spec, None, events, lambda: len(events.updates) >= 3)
    assert caught.value.step == 3 and not any(tmp_path.iterdir())


def test_finish_now_at_step_k_delivers_the_whole_asset_and_records_k(tmp_path: Path):
    from server.pipeline.run import run_job

    class FinishAfterThree(Recorder):
        def finish_requested(self):
            return len(self.updates) >= 3

    spec = JobSpec.from_dict({"prompt": "a red cube", "output_dir": str(tmp_path), **QUICK, "steps": 500})
    events = FinishAfterThree()
    result = run_job(spec, None, events, lambda: False)
    assert [u[0] for u in events.updates] == [1, 2, 3], "no step runs after the finish"
    record = json.loads(result.job_json.read_text())
    assert record["stopped_at_step"] == 3 == result.stopped_at_step == result.to_dict()["stopped_at_step"]
    mesh = trimesh.load(result.glb, force="mesh")
    assert len(mesh.faces) > 0 and mesh.visual.material.baseColorTexture is not None
    assert result.obj.is_file() and Image.open(result.preview_png).width > 0
    assert events.textures[-1][3] and events.texture_steps[-1] == 3, "the final texture is the asset's"
    assert not list(tmp_path.glob(".*partial"))


class StderrWatcher:
    """Reads a process's stderr on a thread (tqdm ends its lines with carriage returns, not newlines)."""

    def __init__(self, process: subprocess.Popen):
        self.text = ""
        self._thread = threading.Thread(target=self._read, args=(process.stderr,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        while chunk := stream.read1(4096) if hasattr(stream, "read1") else stream.read(1):
            self.text += chunk.decode(errors="replace") if isinstance(chunk, bytes) else chunk

    def finish(self, process: subprocess.Popen, timeout: float) -> bytes:
        """The process's stdout once it exits; stderr stays this watcher's alone (no communicate())."""
        stdout = process.stdout.read()
        process.wait(timeout)
        self._thread.join(10)
        return stdout

    def wait_for_step(self, timeout: float = 300) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            steps = re.findall(r"\| *(\d+)/500 ", self.text)
            if steps and int(steps[-1]) >= 1:
                return int(steps[-1])
            time.sleep(0.05)
        raise AssertionError(f"no progress in {timeout} s: {self.text[-2000:]}")


def test_ctrl_c_once_finishes_the_command_line_job_twice_cancels_it(tmp_path: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    command = [sys.executable, "-m", "server", "generate", "--prompt", "a red cube", "--seed", "5"]
    quick = ["--steps", "500", "--grid-resolution", "12", "--render-size", "32", "--texture-size", "128"]

    def start(out: Path) -> tuple[subprocess.Popen, StderrWatcher]:
        process = subprocess.Popen(
            [*command, *quick, "--out", str(out)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        return process, StderrWatcher(process)

    process, watcher = start(tmp_path / "finished")
    seen = watcher.wait_for_step()
    process.send_signal(signal.SIGINT)
    stdout = watcher.finish(process, timeout=300)
    assert process.returncode == 0, watcher.text[-3000:]
    result = json.loads(stdout.decode().strip().splitlines()[-1])
    assert seen <= result["stopped_at_step"] < 500 and "finished early" in watcher.text
    assert json.loads(Path(result["job_json"]).read_text())["stopped_at_step"] == result["stopped_at_step"]
    assert len(trimesh.load(result["glb"], force="mesh").faces) > 0

    process, watcher = start(tmp_path / "cancelled")
    watcher.wait_for_step()
    process.send_signal(signal.SIGINT)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    watcher.finish(process, timeout=120)
    assert process.returncode == 130, watcher.text[-3000:]
    assert "seed 5: cancelled, nothing written" in watcher.text and "Traceback" not in watcher.text
    leftovers = list((tmp_path / "cancelled").rglob("*"))
    assert not leftovers, f"a cancelled job leaves nothing: {leftovers}"


@pytest.fixture
def server(tmp_path: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    process = ServerProcess(sys.executable, ["--output-root", str(tmp_path)], cwd=REPO, env=env)
    process.hello(timeout=120)
    yield process
    process.close()


def messages_until_final(server: ServerProcess, timeout: float = 300):
    messages, deadline = [], time.monotonic() + timeout
    while not messages or messages[-1].type not in FINAL:
        message = server.get(max(0.1, deadline - time.monotonic()))
        assert message is not None, f"no final message in {timeout} s"
        messages.append(message)
    return messages


def test_a_real_job_streams_previews_and_writes_a_valid_glb(server: ServerProcess, tmp_path: Path):
    server.generate("job-1", {"prompt": "a red cube", "seed": 1, **QUICK})
    messages = messages_until_final(server)
    done = messages[-1]
    assert done.type == "done", done.header
    kinds = [m.type for m in messages]
    assert kinds[0] == "accepted" and "progress" in kinds and "preview_mesh" in kinds and "texture" in kinds
    mesh = next(m for m in messages if m.type == "preview_mesh")
    positions, faces = mesh.arrays["positions"], mesh.arrays["faces"]
    assert positions.shape[1] == 3 and faces.max() < len(positions)
    assert done.blobs["glb"][0] == Path(done.header["glb"]).read_bytes()  # remote clients get the file too
    loaded = trimesh.load(done.header["glb"], force="mesh")
    assert len(loaded.faces) > 0 and Path(done.header["preview_png"]).exists()
    assert done.header["steps_per_second"] > 0


def test_bad_input_is_refused_and_the_server_stays_usable(server: ServerProcess):
    server.generate("bad", {"prompt": "a cube", "steps": 0})
    error = server.wait_for("error", 10)
    assert error.header["code"] == "bad_settings" and "steps" in error.header["message"]
    server.generate("bad-prior", {"prompt": "a cube", "prior": "/nonexistent/model/folder", **QUICK})
    messages = messages_until_final(server)
    assert messages[-1].type == "error" and messages[-1].header["code"] == "missing_weights"
    assert server.ping() < 1.0


def test_cancel_is_prompt_and_a_killed_server_is_seen(server: ServerProcess):
    server.generate("long", {"prompt": "a cube", **QUICK, "steps": 5000})
    server.wait_for("progress", 120)
    asked = time.monotonic()
    server.cancel("long")
    cancelled = server.wait_for("cancelled", 5)
    assert time.monotonic() - asked < 1.5 and cancelled.header["job_id"] == "long"
    assert server.ping() < 1.0
    server.generate("again", {"prompt": "a cube", **QUICK, "steps": 5000})
    server.wait_for("progress", 120)
    server.kill()
    with pytest.raises(ConnectionClosed):
        server.wait_for("done", 10)


def test_the_command_line_rerolls_variants_into_assets_and_a_grid(tmp_path: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    command = [sys.executable, "-m", "server", "generate", "--prompt", "a red cube", "--seed", "5"]
    quick = ["--steps", "4", "--grid-resolution", "12", "--render-size", "32", "--texture-size", "128"]
    done = subprocess.run(
        [*command, *quick, "--variants", "2", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    variants = result["variants"]
    assert len(variants) == 2
    for seed, variant in zip((5, 6), variants, strict=True):
        assert {"glb", "preview_png", "job_json", "seconds", "steps_per_second"} <= set(variant)
        assert json.loads(Path(variant["job_json"]).read_text())["seed"] == seed
        assert len(trimesh.load(variant["glb"], force="mesh").faces) > 0
    grid = Image.open(result["grid_png"])
    preview = Image.open(variants[0]["preview_png"])
    assert grid.size == (preview.width, 2 * preview.height)

    refused = subprocess.run(
        [*command, "--steps", "0", "--out", str(tmp_path / "bad")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2 and "steps" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "bad").exists()


def test_guidance_is_the_jobs_else_the_priors_own():
    import torch

    from server.pipeline.setup import prior_stages
    from server.priors import SHAPES_GUIDANCE, MVDreamPrior, Prior

    assert JobSpec.from_dict({"prompt": "a cube"}).guidance_scale is None
    cpu = torch.device("cpu")

    def stages(job: dict) -> list:
        spec = JobSpec.from_dict(job)
        return prior_stages(spec, spec.resolved_profile(), [60, 100], cpu)

    default = stages({"prompt": "a cube"})
    chosen = stages({"prompt": "a cube", "guidance_scale": 7.5})
    assert {s.guidance_scale for s in default} == {SHAPES_GUIDANCE} != {7.5}
    assert {s.guidance_scale for s in chosen} == {7.5}
    assert Prior.guidance_scale == 7.5 and MVDreamPrior.guidance_scale == 50.0


def test_a_jobs_texture_planes_are_no_finer_than_its_renders():
    from server.pipeline.setup import start_job

    for render_size in (32, 64, 128):
        state = start_job(JobSpec.from_dict({"prompt": "a cube", **QUICK, "render_size": render_size}), None)
        planes = [tuple(p.shape[-2:]) for p in state.texture.encoding.planes]
        # One texel per rendered pixel at most: finer planes baked Adam-amplified streaks into
        # the CPU demo's red cube (a 128-texel plane under 64-pixel renders).
        assert planes == [(render_size // 4,) * 2, (render_size,) * 2]


def test_two_cpu_threads_give_the_same_steps_twice():
    import torch

    from server.pipeline.setup import start_job
    from server.pipeline.step import optimisation_step

    def sdf_and_colours_after(steps: int) -> list:
        state = start_job(JobSpec.from_dict({"prompt": "a red cube", "steps": 400, "device": "cpu"}), None)
        for step in range(steps):
            optimisation_step(state, step)
        return [state.geometry.sdf.detach(), *(p.detach() for p in state.texture.parameters())]

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first, again = sdf_and_colours_after(30), sdf_and_colours_after(30)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_the_shape_stage_leaves_the_start_sphere_and_dmtet_starts_from_its_surface():
    """A short job on a torus prompt with the shipped prior: the shape the shape stage hands to DMTet
    is measurably not the start sphere (so a frozen geometry fails this test), and DMTet starts from
    exactly that surface."""
    from server.pipeline.setup import start_job
    from server.pipeline.step import optimisation_step
    from server.shapes.solid import surface_error

    spec = JobSpec.from_dict(
        {"prompt": "a red torus", "seed": 3, "steps": 100, "grid_resolution": 24, "render_size": 64}
    )
    state = start_job(spec, None)
    start = state.geometry().vertices.detach().numpy()
    assert surface_error(start, "sphere") < 0.01
    for step in range(state.volume_steps):
        outcome = optimisation_step(state, step)
    shaped = outcome.mesh.vertices.numpy()
    assert surface_error(shaped, "sphere") > 3 * surface_error(start, "sphere") + 0.02
    proportions = np.ptp(shaped, axis=0)
    assert proportions[2] < 0.8 * proportions[:2].min()  # flatter than tall, as a torus is

    optimisation_step(state, state.volume_steps)  # hands over, then one DMTet step
    with torch.no_grad():
        handed = state.geometry().vertices.numpy()
    assert abs(np.ptp(handed, axis=0) - proportions).max() < 0.1


def test_a_vanished_shape_ends_the_job_with_a_clear_error_not_a_crash():
    """An FSD run on a cone collapsed to nothing in the DMTet stage; the next render found no surface
    and the texture field crashed on zero points. Now the field takes zero points, and the step says
    the shape vanished (reported as the protocol's `nan` error, whose fix names another seed)."""
    from server.job.errors import ShapeVanishedError
    from server.pipeline.setup import start_job
    from server.pipeline.step import mesh_step
    from server.serve import classify_exception
    from server.wire import protocol

    state = start_job(JobSpec.from_dict({"prompt": "a red cone", **QUICK}), None)
    assert state.texture(torch.zeros(0, 3)).shape == (0, 3)
    with torch.no_grad():
        state.geometry.sdf.fill_(1.0)  # outside everywhere: no surface
    with pytest.raises(ShapeVanishedError, match="vanished at step 4") as raised:
        mesh_step(state, 4)
    code, message, fix = classify_exception(raised.value)
    assert code == protocol.NAN and "vanished" in message and "seed" in fix


def test_a_diverged_step_ends_the_job_where_it_is_reported_and_writes_nothing(tmp_path: Path, monkeypatch):
    """The step no longer stops to look at its loss (that would make a GPU wait every step): a prior
    that predicts nothing finite from the second step on (a plain volume step: no hand-over, clean-up
    or bake reads the mesh) still ends the job at that step with the protocol's `nan` error, before its
    progress is sent, and no asset is written. The failure is injected into the real shapes prior; the
    rest is a real job."""
    from server.job.errors import NonFiniteError
    from server.pipeline.setup import start_job
    from server.serve import classify_exception
    from server.wire import protocol

    prior = start_job(JobSpec.from_dict({"prompt": "a red cube", **QUICK}), None).stages[0].prior
    predict, calls = prior.predict_eps, []

    def nothing_finite_from_step_1(x_t, t, cond, uncond, c2w=None):
        calls.append(t)
        eps_cond, eps_uncond = predict(x_t, t, cond, uncond, c2w=c2w)
        nan = float("nan") if len(calls) > 1 else 1.0
        return eps_cond * nan, eps_uncond * nan

    monkeypatch.setattr(prior, "predict_eps", nothing_finite_from_step_1)
    events = Recorder()
    with pytest.raises(NonFiniteError, match="the loss became nan at step 1") as raised:
        from server.pipeline.run import run_job

        run_job(
            JobSpec.from_dict({"prompt": "a red cube", "seed": 1, "output_dir": str(tmp_path), **QUICK}),
            None,
            events,
            lambda: False,
        )
    assert [update[0] for update in events.updates] == [1]
    assert list(tmp_path.iterdir()) == []
    assert classify_exception(raised.value)[0] == protocol.NAN


def test_the_command_line_reports_a_vanished_variant_and_keeps_the_others(
    tmp_path: Path, monkeypatch, capsys
):
    """A seed whose shape vanishes (as FSD's pink cone 103 did) is named with a fix on stderr; the other
    variants are still written and gridded. The failure is injected; the kept variant is a real job."""
    import argparse

    from server.job.errors import ShapeVanishedError
    from server.pipeline import cli

    real_run_job = cli.run_job

    def run_job(spec, *args):
        if spec.seed == 6:
            raise ShapeVanishedError("the shape vanished at step 3: nothing is left to render")
        return real_run_job(spec, *args)

    monkeypatch.setattr(cli, "run_job", run_job)
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    quick = ["--steps", "4", "--grid-resolution", "12", "--render-size", "32", "--texture-size", "128"]
    args = parser.parse_args(
        ["--prompt", "a red cone", "--seed", "5", "--variants", "2", *quick, "--out", str(tmp_path)]
    )
    assert cli.main(args) == 0
    out, err = capsys.readouterr()
    assert "seed 6: error: the shape vanished at step 3" in err and "another seed" in err
    result = json.loads(out.strip().splitlines()[-1])
    assert [json.loads(Path(v["job_json"]).read_text())["seed"] for v in result["variants"]] == [5]
    assert Path(result["grid_png"]).is_file()

    args = parser.parse_args(
        ["--prompt", "a red cone", "--seed", "6", *quick, "--out", str(tmp_path / "none")]
    )
    assert cli.main(args) == 1
