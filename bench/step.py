"""Where one optimisation step's time goes: `python -m server.bench step [--json]`.

One step of `server.pipeline.run.run_job`, stage by stage: marching tetrahedra, render, encode (resize for
a pixel prior, VAE encoder for a latent one), noise (CFD's consistent noise, FSD's world map or SDS's
fresh draw, plus the re-injection), network (the CFG noise prediction of `distill.distillation_step`),
regularisers (forward and backward), encode backward (the flow gradient through the encoder to the
rendered pixels), render backward (to the mesh vertices and the colour field), marching-tets backward
(to the SDF and the deformation), the optimiser, and the occasional island clean-up and milestone
texture bake (zero in the timed steps unless they fall on one). Each method's step is set up as run_job
sets it up (`server.pipeline.setup.start_job`) and runs run_job's own step (`optimisation_step`) with a
`StageTimer`; the one backward call is split in time by gradient hooks, which leave the updates
run_job's to the bit (tests/test_bench.py checks it). Methods alternate step by step, so a busy
neighbour on a shared CPU slows them alike.

A job's steps are of two kinds: the shape stage's (`volume_step`, the first 60 %: two volume-rendered
views a step) and DMTet's (`mesh_step`); each is measured on its own (the DMTet steps from the start
shape handed over at once), and `cfd_over_sds` is the ratio of whole jobs, each stage's step time
weighted by its share of the steps (`cfd_over_sds_volume` and `cfd_over_sds_mesh` are the stages').

Two priors: the shipped shapes prior at the CPU demo settings (JobSpec defaults) and a Stable Diffusion
2.1-base-sized prior with random weights (UNet 866M parameters, SD's VAE, 64x64 latents from 64 px
renders upsampled to 512 px, as the CPU demo would run it; DMTet steps): random weights cost what
trained ones do.
"network" counts the UNet call and, for a latent prior, the VAE encoder's forward and backward.
Wall-clock milliseconds include waiting for a core on a shared machine; the thread's CPU milliseconds
do not (one torch thread), so both are reported. Unless --no-latency, the figures of
`bench.latency` (submission to first preview; preview arrival to display in Blender) follow,
so the last line (with --json) is one JSON object with everything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from tqdm import tqdm

from bench.prior import sd21_unet_config, sd_vae_config
from server.job.spec import JobSpec
from server.pipeline.setup import start_job
from server.pipeline.step import StepTimer, hand_over, optimisation_step
from server.priors import DiffusersPrior, Prior, default_dtype
from server.testing.tiny import sd_scheduler

STAGES = (
    "marching_tets",
    "render",
    "encode",
    "noise",
    "network",
    "encode_backward",
    "regularisers",
    "render_backward",
    "marching_tets_backward",
    "optimiser",
    "island_cleanup",
    "texture_bake",
    "other",
)
VAE_STAGES = ("encode", "encode_backward")


# ------------------------------------------------------------------------------------------ the step


class StageTimer(StepTimer):
    """Accumulates wall-clock and thread-CPU seconds per stage name (synchronising CUDA around each)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)

    def other(self, total_wall: float, total_cpu: float) -> None:
        """Book what a step took beyond its timed stages (camera and timestep draws, Python) as "other"."""
        self.wall["other"] = total_wall - sum(self.wall.values())
        self.cpu["other"] = total_cpu - sum(self.cpu.values())

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._synchronize()
        start, start_cpu = self._clock()
        try:
            yield
        finally:
            self._synchronize()
            end, end_cpu = self._clock()
            self.wall[name] += end - start
            self.cpu[name] += end_cpu - start_cpu

    def backward(self, loss: torch.Tensor, marks: list[tuple[torch.Tensor, str]], last: str) -> None:
        """`loss.backward()`, one call as in run_job, split in time where each mark's gradient is ready.

        marks: (tensor, stage) in the order autograd reaches them; the time until a mark's gradient is
        ready goes to its stage, the time after the last mark to `last`. A mark that gets no gradient
        (the vertices of the frozen geometry) ends where the next boundary is.
        """
        stamps: dict[int, tuple[float, float]] = {}

        def stamper(i: int) -> Callable[[torch.Tensor], None]:
            def hook(_grad: torch.Tensor) -> None:
                stamps.setdefault(i, self._synced_clock())

            return hook

        for i, (tensor, _) in enumerate(marks):
            if tensor.requires_grad:
                tensor.register_hook(stamper(i))
        previous = self._synced_clock()
        loss.backward()
        boundaries = [*(stamps.get(i) for i in range(len(marks))), self._synced_clock()]
        for i in reversed(range(len(marks))):
            boundaries[i] = boundaries[i] or boundaries[i + 1]
        for name, boundary in zip([name for _, name in marks] + [last], boundaries, strict=True):
            self.wall[name] += boundary[0] - previous[0]
            self.cpu[name] += boundary[1] - previous[1]
            previous = boundary

    @staticmethod
    def _clock() -> tuple[float, float]:
        return time.perf_counter(), time.thread_time()

    def _synced_clock(self) -> tuple[float, float]:
        self._synchronize()
        return self._clock()

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# ------------------------------------------------------------------------ an SD-sized prior in memory


class RandomStableDiffusion(DiffusersPrior):
    """Stable Diffusion 2.1-base's UNet and VAE with random weights, behind DiffusersPrior's own methods.

    Built from the configs in memory (saving 3.5 GB of random weights to disk would cost more than the
    benchmark); prompts embed to seeded random [77, cross_attention_dim] contexts since no text encoder
    is loaded.
    encode_images, predict_eps and the rest are DiffusersPrior's, i.e. the generator's real code.
    """

    def __init__(self, device: torch.device | str, dtype: torch.dtype, seed: int = 0):
        Prior.__init__(self)  # not DiffusersPrior's: nothing is loaded from a folder
        self.name = "sd21-sized (random weights)"
        self.device, self.dtype = torch.device(device), dtype
        torch.manual_seed(seed)
        with torch.device(self.device):
            self.unet = UNet2DConditionModel.from_config(sd21_unet_config()).to(dtype)
            self.vae = AutoencoderKL.from_config(sd_vae_config()).to(dtype)
        self.text_encoder = self.tokenizer = None
        self.scheduler = sd_scheduler()
        self._freeze_and_describe(seed)
        self.view_dependent = True
        self._text_generator = torch.Generator(device="cpu").manual_seed(seed + 1)

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        width = self.unet.config.cross_attention_dim
        context = torch.randn(len(texts), 77, width, generator=self._text_generator)
        return context.to(self.device, self.dtype)


# --------------------------------------------------------------------------------------- measuring


@dataclass
class MethodFigures:
    """Per-step medians of one method on one prior."""

    stages_ms: dict[str, float] = field(default_factory=dict)
    stages_cpu_ms: dict[str, float] = field(default_factory=dict)
    ms_step: float = 0.0
    cpu_ms_step: float = 0.0
    ms_network: float = 0.0
    cpu_ms_network: float = 0.0

    @property
    def non_network_share(self) -> float:
        return 1.0 - self.ms_network / self.ms_step

    def to_dict(self) -> dict:
        return {
            "ms_step": round(self.ms_step, 2),
            "cpu_ms_step": round(self.cpu_ms_step, 2),
            "ms_network": round(self.ms_network, 2),
            "cpu_ms_network": round(self.cpu_ms_network, 2),
            "non_network_share": round(self.non_network_share, 4),
            "stages_ms": {k: round(v, 2) for k, v in self.stages_ms.items()},
            "stages_cpu_ms": {k: round(v, 2) for k, v in self.stages_cpu_ms.items()},
        }


def network_stages(prior: Prior) -> tuple[str, ...]:
    """The stages that are the prior's networks: the UNet call, plus the VAE encoder when there is one."""
    return ("network", *VAE_STAGES) if getattr(prior, "vae", None) is not None else ("network",)


def summarise(timers: list[StageTimer], networks: tuple[str, ...]) -> MethodFigures:
    """Medians over steps of each stage and of the step totals (sums of the stages of each step)."""
    figures = MethodFigures()
    for name in STAGES:
        figures.stages_ms[name] = 1e3 * statistics.median(t.wall.get(name, 0.0) for t in timers)
        figures.stages_cpu_ms[name] = 1e3 * statistics.median(t.cpu.get(name, 0.0) for t in timers)
    figures.ms_step = 1e3 * statistics.median(sum(t.wall.values()) for t in timers)
    figures.cpu_ms_step = 1e3 * statistics.median(sum(t.cpu.values()) for t in timers)
    figures.ms_network = 1e3 * statistics.median(sum(t.wall.get(n, 0.0) for n in networks) for t in timers)
    figures.cpu_ms_network = 1e3 * statistics.median(sum(t.cpu.get(n, 0.0) for n in networks) for t in timers)
    return figures


def peak_memory_mb(device: torch.device) -> float:
    """Peak resident memory of this process (CPU) or peak allocated device memory (CUDA), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def measure_prior(
    label: str,
    spec: JobSpec,
    methods: list[str],
    steps: int,
    warmup: int,
    prior: Prior | None = None,
    stage: str = "mesh",
) -> dict:
    """Interleaved steps of every method from the same seed; medians of the timed steps per method.

    stage "volume": the job's first steps, in the shape stage; "mesh": DMTet steps, from the start
    shape handed over at once (a mesh step costs what it costs whatever the shape's history).
    """
    states = {m: start_job(JobSpec.from_dict({**spec.to_dict(), "method": m}), None, prior) for m in methods}
    volume_share = states[methods[0]].volume_steps / spec.steps
    if stage == "mesh":
        for state in states.values():
            hand_over(state)
            state.volume_steps = 0
    device = states[methods[0]].device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timers: dict[str, list[StageTimer]] = {m: [] for m in methods}
    bar = tqdm(
        total=(warmup + steps) * len(methods), desc=label, unit="step", file=sys.stderr, dynamic_ncols=True
    )
    for step in range(warmup + steps):
        for method in methods:
            timer = StageTimer(device)
            start, start_cpu = time.perf_counter(), time.thread_time()
            optimisation_step(states[method], step, timer)
            timer.other(time.perf_counter() - start, time.thread_time() - start_cpu)
            if step >= warmup:
                timers[method].append(timer)
            bar.set_postfix_str(f"{method} step {step}: {1e3 * sum(timer.wall.values()):.0f} ms")
            bar.update()
    bar.close()
    networks = network_stages(states[methods[0]].stages[0].prior)
    figures = {m: summarise(timers[m], networks) for m in methods}
    return {
        "prior": states[methods[0]].stages[0].prior.name,
        "stage": stage,
        "share_of_job_steps": round(volume_share if stage == "volume" else 1.0 - volume_share, 4),
        "settings": {
            "render_size": spec.render_size,
            "grid_resolution": spec.grid_resolution,
            "batch_size": spec.batch_size,
            "latent_size": states[methods[0]].stages[0].prior.latent_size,
            "steps_timed": steps,
            "warmup": warmup,
        },
        "network_stages": list(networks),
        "methods": {m: f.to_dict() for m, f in figures.items()},
        "figures": figures,
        "peak_memory_mb": round(peak_memory_mb(device), 1),
    }


def print_table(label: str, result: dict) -> None:
    figures: dict[str, MethodFigures] = result["figures"]
    methods = list(figures)
    print(f"\n{label}: {result['prior']}, {result['settings']}")
    print(f"{'stage (median ms)':<24}" + "".join(f"{m + ' wall':>11}{m + ' cpu':>11}" for m in methods))
    for name in STAGES:
        row = "".join(
            f"{figures[m].stages_ms[name]:>11.1f}{figures[m].stages_cpu_ms[name]:>11.1f}" for m in methods
        )
        print(f"{name:<24}{row}")
    print(
        f"{'step':<24}"
        + "".join(f"{figures[m].ms_step:>11.1f}{figures[m].cpu_ms_step:>11.1f}" for m in methods)
    )
    print(
        f"{'network':<24}"
        + "".join(f"{figures[m].ms_network:>11.1f}{figures[m].cpu_ms_network:>11.1f}" for m in methods)
    )
    print(f"{'non-network share':<24}" + "".join(f"{figures[m].non_network_share:>22.3f}" for m in methods))
    print(f"peak memory: {result['peak_memory_mb']:.0f} MiB")


def ratio(result: dict, numerator: str, denominator: str, key: str = "ms_step") -> float | None:
    methods = result["methods"]
    if numerator not in methods or denominator not in methods:
        return None
    return round(methods[numerator][key] / methods[denominator][key], 4)


def job_ratio(results: list[dict], numerator: str, denominator: str, key: str = "ms_step") -> float | None:
    """The ratio of two methods' whole-job times: each stage's step time weighted by its share of steps."""
    if any(numerator not in r["methods"] or denominator not in r["methods"] for r in results):
        return None

    def job(method: str) -> float:
        return sum(r["share_of_job_steps"] * r["methods"][method][key] for r in results)

    return round(job(numerator) / job(denominator), 4)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--prompt", default="a red cube")
    parser.add_argument("--methods", default="sds,fsd,cfd", help="methods on the shapes prior")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per method, shapes prior")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps, shapes prior")
    parser.add_argument("--sd-methods", default="sds,cfd", help="methods on the SD-sized prior")
    parser.add_argument("--sd-steps", type=int, default=2, help="timed steps per method, SD-sized prior")
    parser.add_argument("--sd-warmup", type=int, default=0, help="untimed first steps, SD-sized prior")
    parser.add_argument("--sd-render-size", type=int, default=64, help="render side for the SD-sized prior")
    parser.add_argument("--no-sd", action="store_true", help="skip the SD-sized prior")
    parser.add_argument("--no-latency", action="store_true", help="skip the latency measurements")
    parser.add_argument("--latency-repeats", type=int, default=3, help="warm jobs per latency figure")


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    demo = JobSpec.from_dict({"prompt": args.prompt, "device": args.device})
    result: dict = {
        "date": date.today().isoformat(),
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "threads": args.threads,
            "device": str(device),
            "torch": torch.__version__,
        },
        "command": "python -m server.bench " + " ".join(sys.argv[1:]),
    }
    methods = args.methods.split(",")
    volume = measure_prior("shapes, shape stage", demo, methods, args.steps, args.warmup, stage="volume")
    print_table("shapes prior at the CPU demo settings, shape stage (volume)", volume)
    shapes = measure_prior("shapes, DMTet stage", demo, methods, args.steps, args.warmup, stage="mesh")
    print_table("shapes prior at the CPU demo settings, DMTet stage", shapes)
    result["shapes_volume"] = _prior_entry(volume)
    result["shapes"] = _prior_entry(shapes)
    # A job's time is its stages' steps: the ratios of whole jobs weigh each stage by its share of steps.
    result["cfd_over_sds"] = job_ratio([volume, shapes], "cfd", "sds")
    result["cfd_over_sds_cpu"] = job_ratio([volume, shapes], "cfd", "sds", "cpu_ms_step")
    result["fsd_over_sds"] = job_ratio([volume, shapes], "fsd", "sds")
    result["cfd_over_sds_volume"] = ratio(volume, "cfd", "sds")
    result["cfd_over_sds_mesh"] = ratio(shapes, "cfd", "sds")
    print(
        f"\nCFD / SDS per job: {result['cfd_over_sds']} (shape stage {result['cfd_over_sds_volume']}, "
        f"DMTet stage {result['cfd_over_sds_mesh']}); FSD / SDS {result['fsd_over_sds']}"
    )
    if not args.no_sd:
        dtype = default_dtype(device)
        print("building the SD-2.1-sized prior (random weights)...", file=sys.stderr, flush=True)
        sd_prior = RandomStableDiffusion(device, dtype)
        sd_spec = JobSpec.from_dict(
            {"prompt": args.prompt, "device": args.device, "render_size": args.sd_render_size}
        )
        sd = measure_prior(
            "sd21", sd_spec, args.sd_methods.split(","), args.sd_steps, args.sd_warmup, sd_prior
        )
        print_table("SD-2.1-sized prior (random weights)", sd)
        result["sd21"] = _prior_entry(sd)
        result["cfd_over_sds_sd21"] = ratio(sd, "cfd", "sds")
        del sd_prior
    result["peak_memory_mb"] = round(peak_memory_mb(device), 1)
    if not args.no_latency:
        from bench.latency import measure_latency, print_latency

        result["latency"] = measure_latency(args.latency_repeats, args.threads)
        print("\nlatency a user feels (CPU demo job)")
        print_latency(result["latency"])
    if args.json:
        print(json.dumps(result))
    return 0


def _prior_entry(result: dict) -> dict:
    """The JSON of one prior: CFD's headline figures at the top, every method's detail below."""
    entry = {k: v for k, v in result.items() if k != "figures"}
    headline = result["methods"].get("cfd") or next(iter(result["methods"].values()))
    for key in ("ms_step", "cpu_ms_step", "ms_network", "cpu_ms_network", "non_network_share"):
        entry[key] = headline[key]
    return entry
