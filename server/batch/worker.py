"""The process that runs a batch's jobs on one GPU (or a few CPU cores), as a Ray actor.

One actor per GPU lives for the whole batch, so the prior it loads for its first job stays loaded for
the next ones (`server.pipeline.setup.cached_priors`). Each job is the single-job path (`run_job`)
into a scratch folder; the files come back as bytes, so the submitting machine needs no shared file
system. A job whose settings fail, or whose shape diverges, comes back as its error text: it fails
alone and the actor takes the next job.
"""

from __future__ import annotations

import os
import socket
import tempfile

import torch

from server.job.errors import JobSpecError, MissingWeightsError, NonFiniteError
from server.job.events import Events
from server.job.spec import JobSpec
from server.pipeline.run import run_job

JOB_ERRORS = (JobSpecError, MissingWeightsError, NonFiniteError)


class VariantWorker:
    def __init__(self, threads: int):
        torch.set_num_threads(threads)
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def pid(self) -> int:
        """This actor's process id (what a test kills to play a dying worker)."""
        return os.getpid()

    def run(self, settings: dict) -> dict:
        """{"name", "files": {relative path: bytes}, "seconds", "worker"}, or {"error", "worker"}."""
        with tempfile.TemporaryDirectory(prefix="cfd-batch-") as scratch:
            try:
                spec = JobSpec.from_dict({**settings, "output_dir": scratch})
                result = run_job(spec, None, Events(), lambda: False)
            except JOB_ERRORS as error:
                return {"error": str(error), "worker": self.name}
            files = {
                path.relative_to(result.out_dir).as_posix(): path.read_bytes()
                for path in sorted(result.out_dir.rglob("*"))
                if path.is_file()
            }
        return {"name": result.out_dir.name, "files": files, "seconds": result.seconds, "worker": self.name}
