"""A step never waits for its device: nothing in `optimisation_step` reads the job's tensors back to the
host, apart from the named compaction of variable-size results.

On a GPU every read of a device tensor's value on the host (`.item()`, `bool(t)`, `float(t)`, `.cpu()`,
`.numpy()`, `.tolist()`) waits until the device has finished all the work queued before it, so the
host cannot queue the next kernels meanwhile. This machine has no GPU, so the watcher tracks where each
tensor's data comes from instead of where it lives: the job's own tensors (parameters, buffers,
optimiser state, cached tables) and everything computed from them are "device" data; draws from the
job's CPU generator, `torch.tensor` / `torch.from_numpy` of host values and what is computed from
those alone are "host" data, which the step may read freely (a GPU job does the same work on the
CPU). A read of device data, or an operation whose output size depends on device values (`nonzero`,
boolean indexing, `unique`, `repeat_interleave` without `output_size`), is recorded with the function
in `server/` that asked for it.
"""

from __future__ import annotations

import re
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from server.job.spec import JobSpec

SERVER = Path(__file__).resolve().parent.parent / "server"
FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<name>\S+)')

# Operations whose output size depends on device values: the host must learn the size before it can
# allocate the result, which on a GPU is a wait like `.item()`.
# bincount: its result is as long as its input's largest value (CUDA reads it back even with minlength).
DATA_SIZED = {
    "nonzero",
    "masked_select",
    "unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "bincount",
}
HOST_METHODS = ("cpu", "numpy", "tolist")

# Where a step may still wait, and why: each is the extraction or compaction of a variable-size result,
# whose size the host must know to allocate it (threestudio's marching tets and rasteriser do the same).
# Static upper bounds would trade the wait for memory and work proportional to the whole grid or image.
# Only the compaction kinds below are allowed there: a `.item()`, `bool()` or `.cpu()` is not.
COMPACTIONS = {
    "nonzero",
    "index with a boolean mask",
    "index_put with a boolean mask",
    "_unique2",
    "unique_consecutive",
    "repeat_interleave",
}
COMPACTING = {
    "geometry/dmtet.py:marching_tetrahedra": "the surface's tets, vertices and faces: a variable mesh",
    "geometry/regularizers.py:mesh_edges": "the extracted mesh's unique edges",
    "geometry/regularizers.py:laplacian_smoothness": "the extracted mesh's vertices that have edges",
    "geometry/regularizers.py:sdf_sign_change": "the grid edges the surface crosses",
    "render/raster.py:_rasterize_torch": "the covered pixels",
    "render/raster.py:_depth_test": "the triangles with candidate pixels",
    "render/raster.py:_candidates": "the candidate pixels of each scanline",
    "render/raster.py:_depth_test_chunk": "the candidates inside their triangle, and the nearest",
    "render/raster.py:interpolate": "the covered pixels",
    "render/raster.py:_antialias_torch": "the silhouette pixel pairs",
    "render/raster.py:opposite_vertices": "the mesh's distinct edges",
    "render/mesh.py:render_mesh": "the covered pixels the colour field is evaluated at",
    "noise/consistent.py:surface_footprints": "the latent pixels' foreground faces and their lattice cells",
    "noise/consistent.py:rasterize_owners": "the texels the footprint triangles cover",
}
# The scalar reads that size a compaction's memory: a z-buffer over the covered texels, and chunks of
# candidates that bound the rasterisers' memory.
SIZE_READS = {
    "noise/consistent.py:rasterize_owners": "the z-buffer's length and the chunks' bounds",
    "render/raster.py:_depth_test": "the chunks' bounds",
    "render/raster.py:_candidates": "the number of candidate pixels",
}


@dataclass(frozen=True)
class Sync:
    what: str  # the aten op or Tensor method
    site: str  # file (under server/) and function that asked for it
    line: int

    @property
    def allowed(self) -> bool:
        compaction = self.what in COMPACTIONS and self.site in COMPACTING
        return compaction or (self.what == "_local_scalar_dense" and self.site in SIZE_READS)


def asking_site() -> tuple[str, int]:
    """The innermost frame in `server/` of the code that asked for the value; in a backward pass, of the
    forward operation being differentiated (anomaly mode keeps its stack)."""
    node = torch._C._current_autograd_node()
    if node is not None and "traceback_" in node.metadata:
        frames = [
            (match["file"], int(match["line"]), match["name"])
            for match in FRAME.finditer("".join(node.metadata["traceback_"]))
        ]
    else:
        frames = [(frame.filename, frame.lineno, frame.name) for frame in traceback.extract_stack()]
    for filename, line, name in reversed(frames):
        path = Path(filename)
        if path.is_relative_to(SERVER):
            return f"{path.relative_to(SERVER).as_posix()}:{name}", line
    return "(outside server/):?", 0


class SyncWatcher(TorchDispatchMode):
    """Records every read-back of device data (see the module docstring) within its `with` block."""

    def __init__(self, host_generator: torch.Generator, host_tensors: list[torch.Tensor] = ()):
        super().__init__()
        self.host_generator = host_generator
        self.host = WeakIdKeyDictionary({t: True for t in host_tensors})
        self.syncs: list[Sync] = []
        self.methods = _HostReads(self)

    def __enter__(self):
        self.anomaly = torch.autograd.detect_anomaly(check_nan=False)  # the forward stacks of backward ops
        self.anomaly.__enter__()
        self.methods.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.methods.__exit__(*exc)
        return self.anomaly.__exit__(*exc)

    def is_device(self, tensor: torch.Tensor) -> bool:
        return tensor not in self.host

    def record(self, what: str) -> None:
        site, line = asking_site()
        self.syncs.append(Sync(what, site, line))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        on_device = [t for t in tensors if self.is_device(t)]
        if on_device:
            sized = name in DATA_SIZED or (name == "repeat_interleave" and kwargs.get("output_size") is None)
            if isinstance(out, bool | int | float) or sized:  # item(), bool(t), equal(); nonzero, unique
                self.record(name)
            elif name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None
            ):
                self.record(f"{name} with a boolean mask")
        generator = kwargs.get("generator")  # a new wrapper of the same generator: compare what it wraps
        drawn_on_host = generator is not None and generator._cdata == self.host_generator._cdata
        if drawn_on_host or name in ("lift_fresh", "lift_fresh_copy") or (tensors and not on_device):
            for tensor in tree_flatten(out)[0]:
                if isinstance(tensor, torch.Tensor):
                    self.host[tensor] = True
        return out


class _HostReads(TorchFunctionMode):
    """The Tensor methods that hand device data to the host without an aten op on a CPU machine
    (`.cpu()` of a CPU tensor is the tensor itself), and the moves that make host data device data."""

    def __init__(self, watcher: SyncWatcher):
        super().__init__()
        self.watcher = watcher

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        subject = args[0] if args and isinstance(args[0], torch.Tensor) else None
        to_host = name == "to" and "cpu" in (*args[1:], kwargs.get("device"))
        if subject is not None and self.watcher.is_device(subject) and (name in HOST_METHODS or to_host):
            self.watcher.record(f"Tensor.{name}")
        out = func(*args, **kwargs)
        if name == "from_numpy":
            self.watcher.host[out] = True
        elif name == "to" and any(isinstance(a, torch.device) for a in (*args[1:], kwargs.get("device"))):
            # `.to(job device)`: host data becomes device data (on a CPU machine it is the same tensor)
            self.watcher.host.pop(out, None)
        return out


def watch(generator: torch.Generator, *optimizers: torch.optim.Optimizer) -> SyncWatcher:
    """A watcher for one step of a job with this CPU generator: its optimisers' Adam step counts stay on
    the host, as torch keeps them (neither capturable nor fused)."""
    counts = [
        entry["step"] for optimizer in optimizers for entry in optimizer.state.values() if "step" in entry
    ]
    return SyncWatcher(generator, counts)


def unexpected(syncs: list[Sync]) -> str:
    """The syncs not allowed above, counted per kind and site, one per line."""
    counts = Counter(f"{s.what} in {s.site} (line {s.line})" for s in syncs if not s.allowed)
    return "\n".join(f"{n} x {where}" for where, n in sorted(counts.items()))


def first_plain_mesh_step(state) -> int:
    """The first DMTet step that neither cleans islands nor bakes a milestone (those read the mesh on the
    host on purpose, a few times a job)."""
    every = state.opt.island_cleanup_every
    step = state.volume_steps
    while step % every == every - 1 or step + 1 in state.milestones:
        step += 1
    return step


QUICK = {"steps": 20, "grid_resolution": 12, "texture_size": 128, "render_size": 32, "device": "cpu"}


@pytest.mark.parametrize("method", ["cfd", "sds", "fsd"])
def test_a_volume_step_and_a_dmtet_step_read_nothing_back_but_variable_sizes(method: str):
    """One step of the shape stage and one DMTet step of a small real job on the shipped shapes prior:
    no `.item()`, `bool`, `.cpu()` or `.numpy()` of the job's data anywhere in `optimisation_step`;
    only the listed compactions wait for their sizes (and the DMTet step needs some of them: it ran)."""
    from server.pipeline.setup import start_job
    from server.pipeline.step import optimisation_step

    state = start_job(JobSpec.from_dict({"prompt": "a red cube", "method": method, **QUICK}), None)
    assert state.volume_steps > 1
    with watch(state.generator, state.volume_optimizer) as watcher:
        optimisation_step(state, 0)
    assert not unexpected(watcher.syncs), (
        f"the volume step waits for the device:\n{unexpected(watcher.syncs)}"
    )

    mesh_step = first_plain_mesh_step(state)
    for step in range(1, mesh_step):
        optimisation_step(state, step)
    with watch(state.generator, state.optimizer) as watcher:
        outcome = optimisation_step(state, mesh_step)
    waits = unexpected(watcher.syncs)
    assert not waits, f"the DMTet step waits for the device:\n{waits}"
    sites = {s.site for s in watcher.syncs}
    assert "geometry/dmtet.py:marching_tetrahedra" in sites  # the watcher saw the step's own compaction
    assert outcome.loss.dim() == 0 and outcome.loss.device == state.device


def test_a_texture_jobs_step_reads_nothing_back_but_variable_sizes():
    """A texture job's step (the artist's mesh kept, only the colour field optimised; CFD) after its first:
    the same rule."""
    import trimesh

    from server.job.fixed_mesh import FixedMesh
    from server.pipeline.texture import start_texture_job, texture_step

    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    mesh = FixedMesh.from_arrays(sphere.vertices, sphere.faces)
    spec = JobSpec.from_dict({"prompt": "a red sphere", "kind": "texture", **QUICK, "steps": 8})
    state = start_texture_job(spec, mesh)
    step = 2  # the milestones (a bake, on the host on purpose) follow steps 1, 3 and 5
    assert step + 1 not in state.milestones
    for before in range(step):
        texture_step(state, before)
    with watch(state.generator, state.optimizer) as watcher:
        texture_step(state, step)
    waits = unexpected(watcher.syncs)
    assert not waits, f"the texture step waits for the device:\n{waits}"
    assert "render/raster.py:_rasterize_torch" in {s.site for s in watcher.syncs}


def test_the_watcher_sees_reads_of_device_data_and_lets_host_draws_pass():
    """What the step test relies on: a read of device data is recorded with its site, whatever the form
    (`.item()`, `bool`, `.cpu()`, `.numpy()`, `.tolist()`, `.to("cpu")`, a boolean mask), while values
    drawn from the job's CPU generator or made from Python numbers are read freely."""
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(8)  # made before the step: the job's device data
    with SyncWatcher(generator) as watcher:
        t = int(torch.randint(0, 1000, (1,), generator=generator).item())  # host: the job's generator
        scale = float(torch.tensor(2.0) * 3)  # host: a Python number's tensor
        loss = (weights * scale).sum()
        assert not watcher.syncs
        loss.item()
        bool(loss > 0)
        loss.cpu()
        weights.numpy()
        weights.tolist()
        weights.to("cpu")
        weights[weights > 0]
        torch.tensor(1.0).to(torch.device("cpu")).item()  # moved to the job's device: device data
    kinds = [s.what for s in watcher.syncs]
    assert kinds.count("_local_scalar_dense") == 3
    assert {"Tensor.cpu", "Tensor.numpy", "Tensor.tolist", "Tensor.to", "index with a boolean mask"} <= set(
        kinds
    )
    assert all(s.site == "(outside server/):?" and not s.allowed for s in watcher.syncs)
    assert 0 <= t < 1000 and scale == 6.0
