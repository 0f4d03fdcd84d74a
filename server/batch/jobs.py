"""A batch's jobs: every (prompt, seed) pair, each checked as the single-job path checks its settings.

stdlib only (plus the job's own settings module), so a command line can list and check a batch before
Ray or torch load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from server.job.errors import JobSpecError
from server.job.spec import JobSpec


@dataclass(frozen=True)
class BatchJob:
    """One job of a batch: `settings` is its `JobSpec.from_dict` dict (no output folder: the worker
    writes where it runs, the submitting machine where `--out` says); `error` is the `JobSpecError`
    text when the settings are invalid, and such a job is never sent."""

    index: int
    prompt: str
    seed: int
    settings: dict
    error: str | None = None

    def label(self) -> dict:
        return {"prompt": self.prompt, "seed": self.seed}


def parse_seeds(text: str) -> list[int]:
    """ "0-7", "0,3,5" or both ("0-3,9"), in the order given, each seed once."""
    seeds: list[int] = []
    for part in text.replace(" ", "").split(","):
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f'seeds: {part!r} is not a seed or a range; write e.g. "0-7" or "0,3,5"')
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise ValueError(f"seeds: the range {part!r} runs backwards; write {high}-{low}")
        seeds.extend(s for s in range(low, high + 1) if s not in seeds)
    return seeds


def read_prompts(path: Path) -> list[str]:
    """One prompt a line; blank lines and lines starting with # are skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def batch_jobs(prompts: list[str], seeds: list[int], settings: dict) -> list[BatchJob]:
    """Every prompt with every seed, prompt-major (a prompt's variants finish together)."""
    jobs = []
    for prompt in prompts:
        for seed in seeds:
            fields = {**settings, "prompt": prompt, "seed": seed}
            try:
                JobSpec.from_dict(fields)
            except JobSpecError as error:
                jobs.append(BatchJob(len(jobs), prompt, seed, fields, str(error)))
                continue
            jobs.append(BatchJob(len(jobs), prompt, seed, fields))
    return jobs
