"""Marching tetrahedra side by side with threestudio's: `python -m server.bench render --vs-threestudio PATH`.

PATH is a local threestudio checkout (or its `threestudio/models/isosurface.py`); threestudio is not a
dependency. Only `MarchingTetrahedraHelper` is measured, so the file is loaded on its own with
stand-ins for the three threestudio modules it imports (its logger, its `Mesh` record and its jaxtyping
aliases): what runs is threestudio's own extraction code. Both extract the same surface from the same
SDF on the same Kuhn grid (threestudio reads the grid from an .npz, as it reads its `load/tets/`
files; its SDF is positive inside, ours negative), and each time covers the forward pass and the
backward pass to the SDF and the per-vertex deformation, interleaved repeat by repeat in one run.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from server.geometry.dmtet import DMTet
from server.geometry.tetgrid import kuhn_grid

ISOSURFACE = Path("threestudio") / "models" / "isosurface.py"


def isosurface_file(path: Path) -> Path:
    """threestudio's isosurface.py from a checkout's root or the file itself, else a clear error."""
    candidates = [path] if path.suffix == ".py" else [path / ISOSURFACE, path / "models" / "isosurface.py"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no threestudio isosurface.py at {path}: pass a threestudio checkout "
        f"(git clone https://github.com/threestudio-project/threestudio) or the path of its {ISOSURFACE}"
    )


class _Typing(types.ModuleType):
    """jaxtyping's `Float[Tensor, "N 3"]` and friends, as annotations that mean nothing at run time."""

    class _Annotation:
        def __class_getitem__(cls, item: Any) -> Any:
            return Any

    def __init__(self) -> None:
        super().__init__("threestudio.utils.typing")
        import typing

        for name in ("Any", "Callable", "Dict", "List", "Optional", "Tuple", "Union"):
            setattr(self, name, getattr(typing, name))
        self.Tensor = torch.Tensor
        for name in ("Float", "Integer", "Int", "Bool", "Num", "Shaped"):
            setattr(self, name, self._Annotation)
        self.__all__ = [name for name in vars(self) if not name.startswith("_")]


class _Mesh:
    """threestudio's Mesh, reduced to the record the helper returns."""

    def __init__(self, v_pos: torch.Tensor, t_pos_idx: torch.Tensor, **extras: Any) -> None:
        self.v_pos, self.t_pos_idx, self.extras = v_pos, t_pos_idx, extras


def load_helper_class(path: Path) -> type:
    """threestudio's MarchingTetrahedraHelper, loaded from its file with stand-ins for its imports."""
    package = types.ModuleType("threestudio")
    package.warn = lambda *args, **kwargs: None
    models = types.ModuleType("threestudio.models")
    mesh = types.ModuleType("threestudio.models.mesh")
    mesh.Mesh = _Mesh
    utils = types.ModuleType("threestudio.utils")
    stand_ins = {
        "threestudio": package,
        "threestudio.models": models,
        "threestudio.models.mesh": mesh,
        "threestudio.utils": utils,
        "threestudio.utils.typing": _Typing(),
    }
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        spec = importlib.util.spec_from_file_location("threestudio_isosurface", isosurface_file(path))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    return module.MarchingTetrahedraHelper


def _median_ms(run: Callable[[], None], device: torch.device) -> Callable[[], float]:
    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return 1000.0 * (time.perf_counter() - start)

    return timed


def compare(path: Path, n: int, repeats: int, device: torch.device) -> dict:
    """Forward + backward of both extractions on the Kuhn grid with n cells per axis, interleaved."""
    helper_class = load_helper_class(path)
    grid = kuhn_grid(n, radius=1.0)
    ours = DMTet(grid, device=device)
    ours.init_sphere(0.51)  # off the lattice: no vertex with sdf exactly 0, whose side the two define apart
    with torch.no_grad():
        x, y, z = ours.grid_vertices.unbind(-1)
        ours.sdf += 0.04 * torch.sin(7 * x) * torch.sin(7 * y) * torch.sin(7 * z)
    with tempfile.TemporaryDirectory() as folder:
        tets = Path(folder) / f"kuhn_{n}_tets.npz"
        np.savez(tets, vertices=grid.vertices.astype(np.float32), indices=grid.tets.astype(np.int64))
        theirs = helper_class(n, str(tets)).to(device)
    level = (-ours.sdf.detach()).reshape(-1, 1).clone().requires_grad_(True)
    deformation = torch.zeros(len(grid.vertices), 3, device=device, requires_grad=True)

    def ours_step() -> None:
        ours.zero_grad(set_to_none=True)
        ours().vertices.square().sum().backward()

    def theirs_step() -> None:
        level.grad = deformation.grad = None
        theirs(level, deformation).v_pos.square().sum().backward()

    with torch.no_grad():
        faces_ours, faces_theirs = len(ours().faces), len(theirs(level, deformation).t_pos_idx)
    timed_ours, timed_theirs = _median_ms(ours_step, device), _median_ms(theirs_step, device)
    timed_ours(), timed_theirs()  # warm-up: threestudio builds its edge list on first use
    ms_ours, ms_theirs = [], []
    for _ in range(repeats):
        ms_ours.append(timed_ours())
        ms_theirs.append(timed_theirs())
    ours_ms, theirs_ms = statistics.median(ms_ours), statistics.median(ms_theirs)
    return {
        "grid_cells_per_axis": n,
        "grid_vertices": len(grid.vertices),
        "grid_tets": len(grid.tets),
        "faces_ours": faces_ours,
        "faces_threestudio": faces_theirs,
        "ms_ours": round(ours_ms, 2),
        "ms_threestudio": round(theirs_ms, 2),
        "threestudio_over_ours": round(theirs_ms / ours_ms, 3),
        "repeats": repeats,
        "device": str(device),
    }
