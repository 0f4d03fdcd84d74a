"""The full-size smoke run of every SD stage (`bench.stages`) and the GPU check (`bench.gpu`)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def bench_args(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_the_gpu_check_refuses_clearly_without_cuda():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run(
        [sys.executable, "-m", "server.bench", "gpu"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "no CUDA device" in done.stderr and "--device cpu --tiny" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_gpu_checks_code_path_runs_every_stage_in_both_precisions(capsys):
    from bench import gpu

    args = bench_args(gpu, ["--device", "cpu", "--tiny", "--grid", "12", "--steps-per-stage", "2", "--json"])
    assert gpu.main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["precision"] for r in summary["results"]] == ["fp16", "fp32"]
    for result in summary["results"]:
        assert result["nan_free"] and result["sd_step_gflop"] > 0
        assert [s["stage"] for s in result["stages"]] == ["coarse", "geometry", "texture"]
        assert [s["renders"] for s in result["stages"]] == [[32, 32], [64, 64], [64, 64]]
        assert all(s["median_s"] > 0 and len(s["step_s"]) == 2 for s in result["stages"])


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_every_sd_stage_runs_at_full_size_on_the_cpu():
    """SD 2.1-base's real architecture (random weights, fp32), 512 px mesh renders, Kuhn 64, 2 steps a
    stage: SD's latents in every stage, each stage starting from the surface the one before left.
    About 8 CPU-minutes (18 min wall on the shared 2-core machine) and 13 GB peak RSS on one thread
    (bench/README.md): `python -m server.bench stages` runs it."""
    from bench import stages
    from server.testing.sd21 import RandomSD21

    args = bench_args(stages, [])
    spec = stages.stage_job("sd", 2, args.render_size, args.coarse_size, args.grid, "cpu", "fp32")
    prior = RandomSD21("cpu", torch.float32, [stages.PROMPT])
    figures = stages.run_stages(spec, prior)
    assert [f.name for f in figures] == ["coarse", "geometry", "texture"]
    assert [f.render_sizes for f in figures] == [[128, 128], [512, 512], [512, 512]]
    assert all(f.finite and f.steps == 2 for f in figures)
    # SD's 64x64 latents: two views a step in the volume stage, one on the mesh.
    assert [f.latent_shape for f in figures] == [[2, 4, 64, 64], [1, 4, 64, 64], [1, 4, 64, 64]]
    coarse, geometry, texture = figures
    assert coarse.timesteps == [980, 212] and geometry.timesteps[0] == 980 and texture.timesteps == [404, 260]
    # The volume's isosurface starts the DMTet (at Kuhn 64: tens of thousands of faces), and the
    # texture stage starts from the geometry stage's surface.
    assert geometry.faces_at_start > 10_000 and texture.faces_at_start > 10_000
