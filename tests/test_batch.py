"""Batches on a real local Ray instance (2 CPUs, the shipped shapes prior, a few steps on a coarse grid):
the assets are the single-job path's, a killed worker's job is sent again and nothing is lost or
written twice, a bad job fails alone, and the command line ends with its JSON line."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trimesh

from server.batch.driver import BatchListener, run_batch
from server.batch.jobs import BatchJob, batch_jobs, parse_seeds, read_prompts
from server.job.events import Events
from server.job.spec import JobSpec

REPO = Path(__file__).resolve().parent.parent
QUICK = {"steps": 6, "grid_resolution": 12, "texture_size": 128, "render_size": 32}
CPU_WORKER = {"num_cpus": 1}


def asset_folders(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_dir())


def test_seeds_are_ranges_and_lists_and_bad_ones_are_named(tmp_path: Path):
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("5, 0-2,1") == [5, 0, 1, 2]
    for bad, named in (("3-1", "backwards"), ("a", "'a'"), ("1-", "'1-'"), ("-2", "'-2'")):
        with pytest.raises(ValueError, match=named):
            parse_seeds(bad)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n\n# a comment\n  a blue sphere  \n")
    assert read_prompts(prompts) == ["a red cube", "a blue sphere"]


def test_a_batch_makes_the_single_job_paths_assets_and_a_bad_job_fails_alone(ray_address, tmp_path: Path):
    from server.pipeline.run import run_job

    jobs = batch_jobs(["a red cube", "a blue sphere"], [0, 1], QUICK)
    # Settings that the submitting side did not check (a job built by hand) fail in the worker, with
    # the single-job path's JobSpecError text, and the other jobs go on.
    bad = BatchJob(len(jobs), "a green cone", 0, {**QUICK, "prompt": "a green cone", "steps": 0})
    result = run_batch([*jobs, bad], tmp_path / "batch", workers=2, resources=CPU_WORKER)

    with pytest.raises(ValueError) as refused:
        JobSpec.from_dict(bad.settings)
    assert result.to_dict()["failed"] == [{"prompt": "a green cone", "seed": 0, "error": str(refused.value)}]
    assert not result.retried and not result.cancelled
    assets = result.to_dict()["assets"]
    assert [(a["prompt"], a["seed"]) for a in assets] == [(j.prompt, j.seed) for j in jobs]
    assert len(asset_folders(tmp_path / "batch")) == 4 and not list((tmp_path / "batch").glob(".*"))
    assert len({a["worker"] for a in assets}) == 2, "both workers took jobs"
    for asset in assets:
        record = json.loads(Path(asset["job_json"]).read_text())
        assert record["job"]["output_dir"] == str(tmp_path / "batch") and record["seed"] == asset["seed"]
        spec = JobSpec.from_dict({**record["job"], "output_dir": str(tmp_path / "single")})
        single = run_job(spec, None, Events(), lambda: False)
        assert Path(asset["glb"]).read_bytes() == single.glb.read_bytes(), "same seed, same asset"
        assert len(trimesh.load(asset["glb"], force="mesh").faces) > 0


class KillFirstWorker(BatchListener):
    """Kills the worker of the first job `delay_s` after the job was sent (well into its steps)."""

    def __init__(self, delay_s: float):
        self.delay_s, self.killed, self.timers = delay_s, None, []

    def started(self, job: BatchJob, worker_pid: int) -> None:
        if self.killed is None:
            self.killed = (job.prompt, job.seed, worker_pid)
            kill = getattr(signal, "SIGKILL", signal.SIGTERM)
            self.timers.append(threading.Timer(self.delay_s, os.kill, (worker_pid, kill)))
            self.timers[-1].start()


def test_a_worker_killed_mid_job_has_its_job_sent_again_and_nothing_is_lost(ray_address, tmp_path: Path):
    jobs = batch_jobs(["a red cube"], [0, 1], {**QUICK, "steps": 20})
    killer = KillFirstWorker(delay_s=3.0)  # the worker is up when its job is sent: the kill lands in it
    result = run_batch(jobs, tmp_path, workers=2, resources=CPU_WORKER, retries=1, listener=killer)

    prompt, seed, pid = killer.killed
    record = result.to_dict()
    assert [(r["prompt"], r["seed"]) for r in record["retried"]] == [(prompt, seed)]
    assert f"worker {pid} lost" in record["retried"][0]["error"]
    assert not record["failed"] and not record["cancelled"]
    assert sorted(a["seed"] for a in record["assets"]) == [0, 1], "each job once"
    assert next(a for a in record["assets"] if a["seed"] == seed)["worker"] != f"{socket.gethostname()}:{pid}"
    folders = asset_folders(tmp_path)
    assert len(folders) == 2 and not list(tmp_path.glob(".*")), "two assets, no half-written folder"
    for asset in record["assets"]:
        assert len(trimesh.load(asset["glb"], force="mesh").faces) > 0


def test_the_command_line_joins_a_cluster_and_ends_with_the_batchs_json(ray_address, tmp_path: Path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a red cube\n{'x' * 600}\n")
    command = [sys.executable, "-m", "server", "batch", "--ray", ray_address, "--prompts", str(prompts)]
    quick = [f"--{k.replace('_', '-')}={v}" for k, v in QUICK.items()]
    done = subprocess.run(
        [*command, "--seeds", "3", *quick, "--workers", "1", "--out", str(tmp_path / "out"), "--json"],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 1, done.stderr[-3000:]  # a job failed
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert [(a["prompt"], a["seed"]) for a in record["assets"]] == [("a red cube", 3)]
    assert record["failed"] == [
        {"prompt": "x" * 600, "seed": 3, "error": "prompt: must be at most 500 characters, got 600"}
    ]
    assert "prompt: must be at most 500 characters" in done.stderr and "Traceback" not in done.stderr
    assert Path(record["grids"]["a red cube"]).is_file() and Path(record["assets"][0]["glb"]).is_file()

    for bad, named in ((["--workers", "0"], "--workers"), (["--seeds", "3-1"], "backwards")):
        refused = subprocess.run(
            [*command, *bad, "--out", str(tmp_path / "bad")],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert refused.returncode == 2 and named in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to one child process is POSIX")
def test_ctrl_c_stops_the_running_jobs_and_keeps_the_finished_ones(ray_address, tmp_path: Path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "server", "batch", "--ray", ray_address, "--prompt", "a red cube"]
    # Jobs long enough (a second or two each) that the second is still running when the signal lands:
    # at QUICK's 6 steps all three could finish inside the poll before it.
    quick = [f"--{k.replace('_', '-')}={v}" for k, v in {**QUICK, "steps": 40}.items()]
    child = subprocess.Popen(
        [*command, "--seeds", "0-2", *quick, "--workers", "1", "--out", str(out), "--json"],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not (out.is_dir() and asset_folders(out)) and time.monotonic() < deadline:
        time.sleep(0.2)
    child.send_signal(signal.SIGINT)  # the second job has just been sent
    stdout, stderr = child.communicate(timeout=60)
    assert child.returncode == 130, stderr[-3000:]
    record = json.loads(stdout.strip().splitlines()[-1])
    assert record["assets"] and record["cancelled"], record
    assert len(record["assets"]) + len(record["cancelled"]) == 3 and not record["failed"]
    assert [Path(a["out_dir"]) for a in record["assets"]] == asset_folders(out), "kept, and only those"
    assert not list(out.glob(".*")), "no half-written folder"


def test_the_batch_bench_puts_one_and_two_workers_beside_the_single_job_path(ray_address, tmp_path, capsys):
    from bench import batch as bench_batch

    parser = argparse.ArgumentParser()
    bench_batch.add_arguments(parser)
    quick = ["--jobs", "2", "--steps", "4", "--grid-resolution", "12", "--texture-size", "128"]
    assert bench_batch.main(parser.parse_args([*quick, "--out", str(tmp_path), "--json"])) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [b["workers"] for b in record["batches"]] == [1, 2]
    for figures in [record["single"], *record["batches"]]:
        assert figures["jobs_per_hour"] == pytest.approx(2 / figures["wall_s"] * 3600, rel=0.05)
    one = record["batches"][0]
    assert 0 < one["startup_s"] < one["wall_s"]
    # a difference of two timings: a few hundredths either side of zero is the machine's noise
    assert abs(record["overhead_per_job_s"]) < one["job_s_mean"]
    assert [len(asset_folders(tmp_path / name)) for name in ("single", "ray1", "ray2")] == [2, 2, 2]


def frames_until_the_end(server) -> list:
    """The frames of the batch in flight, up to its final one (batch_done, cancelled or error)."""
    frames = []
    while not frames or frames[-1].type not in ("batch_done", "error", "cancelled"):
        message = server.get(timeout=300)
        assert message is not None, "the server went quiet"
        frames.append(message)
    return frames


def test_a_server_batch_streams_each_variant_with_its_glb_and_a_bad_one_fails_alone(ray_address, tmp_path):
    """The `batch` message on a real `serve` process joined to the session's Ray: each variant arrives as
    its own `done` with the GLB bytes the batch wrote, progress counts variants, a bad prompt fails alone;
    a cancelled batch stops within seconds."""
    from server.wire.client import ServerProcess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    server = ServerProcess(
        sys.executable, ["--ray", ray_address, "--output-root", str(tmp_path)], cwd=REPO, env=env
    )
    try:
        server.hello()
        job = {**QUICK, "prompt": "a red cube", "prior": "shapes", "device": "cpu"}
        server.batch("b1", job, [0, 1], prompts=["a red cube", "x" * 600])
        frames = frames_until_the_end(server)
        # Cancel stops a batch promptly: its workers are killed, and the batch ends with `cancelled`.
        server.batch("b2", {**job, "steps": 400}, [5, 6, 7])
        assert server.wait_for("accepted", 30).get("job_id") == "b2"
        time.sleep(3.0)
        server.cancel("b2")
        cancelled_at = time.monotonic()
        ending = frames_until_the_end(server)[-1]
        stopped_s = time.monotonic() - cancelled_at
        assert ending.type == "cancelled" and ending.get("job_id") == "b2", ending.header
        assert stopped_s < 10.0, stopped_s
        assert server.ping() < 1.0, "the server takes the next request"
    finally:
        server.shutdown()
        server.close()
    assert frames[0].type == "accepted" and frames[0].get("job_id") == "b1"
    final = frames[-1]
    assert final.type == "batch_done", final.header
    assert final.get("assets") == 2 and not final.get("retried") and not final.get("cancelled")
    assert final.get("failed") == [
        {"prompt": "x" * 600, "seed": s, "error": "prompt: must be at most 500 characters, got 600"}
        for s in (0, 1)
    ]
    done = [m for m in frames if m.type == "done"]
    assert sorted((m.get("seed"), m.get("prompt"), m.get("batch_id")) for m in done) == [
        (0, "a red cube", "b1"),
        (1, "a red cube", "b1"),
    ]
    assert len({m.get("job_id") for m in done}) == 2
    for message in done:
        glb = message.blobs["glb"][0]
        assert glb == Path(message.get("glb")).read_bytes(), "the bytes the batch wrote"
        assert Path(message.get("glb")).is_relative_to(tmp_path / "b1")
        assert len(trimesh.load(trimesh.util.wrap_as_stream(glb), file_type="glb", force="mesh").faces) > 0
    counts = [(m.get("step"), m.get("total")) for m in frames if m.type == "progress"]
    assert counts[0] == (0, 4) and counts[-1] == (4, 4) and counts == sorted(counts)


class FinishOnFirstStart(BatchListener):
    """Asks the batch to finish as soon as its first job is sent (a client's Finish now)."""

    def __init__(self):
        self.sent: list[int] = []

    def started(self, job: BatchJob, worker_pid: int) -> None:
        self.sent.append(job.seed)


def test_finishing_a_batch_sends_no_new_job_and_delivers_the_running_one(ray_address, tmp_path: Path):
    listener = FinishOnFirstStart()
    jobs = batch_jobs(["a red cube"], [0, 1, 2], QUICK)
    result = run_batch(
        jobs,
        tmp_path,
        workers=2,
        resources=CPU_WORKER,
        listener=listener,
        finishing=lambda: bool(listener.sent),
    ).to_dict()
    assert listener.sent == [0], "nothing was sent after Finish now"
    assert [a["seed"] for a in result["assets"]] == [0] and not result["failed"]
    assert [c["seed"] for c in result["cancelled"]] == [1, 2]
    assert len(trimesh.load(result["assets"][0]["glb"], force="mesh").faces) > 0
    assert len(asset_folders(tmp_path)) == 1
