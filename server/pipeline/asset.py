"""A finished job on disk: GLB + OBJ, baked texture, preview PNG and job.json, written into a staging
folder that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from server import __version__
from server.job.events import Events
from server.job.spec import JobSpec
from server.pipeline.export import UVAtlas, bake_and_export
from server.render.cameras import orbit_c2w
from server.render.mesh import render_mesh

TARGET_FACES = 10000  # decimate before UV unwrapping: xatlas takes ~10 s at 15k faces on a CPU
PREVIEW_VIEWS = ((15.0, -45.0), (15.0, 45.0), (15.0, 135.0), (60.0, -135.0))


@dataclass
class JobResult:
    out_dir: Path
    glb: Path
    obj: Path
    preview_png: Path
    job_json: Path
    seconds: float
    steps_per_second: float
    stopped_at_step: int | None = None  # where "finish now" stopped the optimisation; None: every step ran

    def to_dict(self) -> dict:
        return {
            "glb": str(self.glb),
            "obj": str(self.obj),
            "preview_png": str(self.preview_png),
            "job_json": str(self.job_json),
            "out_dir": str(self.out_dir),
            "seconds": round(self.seconds, 2),
            "steps_per_second": round(self.steps_per_second, 3),
            "stopped_at_step": self.stopped_at_step,
        }


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "asset"


def render_preview(
    mesh_vertices: torch.Tensor, faces: torch.Tensor, color_fn, size: int = 256
) -> Image.Image:
    """A few fixed views of the asset, side by side: what a person looks at first."""
    c2w = torch.stack([torch.from_numpy(orbit_c2w(e, a, 2.4)).float() for e, a in PREVIEW_VIEWS])
    fovy = torch.full((len(PREVIEW_VIEWS),), math.radians(40.0))
    light = torch.nn.functional.normalize(c2w[:, :3, 3] + torch.tensor([0.0, 0.0, 1.5]), dim=-1)
    with torch.no_grad():
        out = render_mesh(mesh_vertices, faces, c2w, fovy, size, color_fn=color_fn, light_dir=light)
    row = torch.cat(list(out.rgb), dim=1).clamp(0, 1)
    return Image.fromarray((row.numpy() * 255).round().astype(np.uint8))


@contextmanager
def staged_folder(root: Path, name: str) -> Iterator[Path]:
    """`root/.name.partial` to fill; renamed to `root/name` only when the block completes, removed if
    it raises, so a reader never sees half an asset."""
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{name}.partial"
    staging.mkdir()
    try:
        yield staging
        os.replace(staging, root / name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_asset(
    spec: JobSpec,
    vertices: torch.Tensor,
    faces: torch.Tensor,
    color_fn,
    texture,
    events: Events,
    start: float,
    atlas: UVAtlas | None = None,
    stopped_at_step: int | None = None,
) -> JobResult:
    """Everything is written into a staging folder that is renamed into place only when complete.
    `stopped_at_step`: the job was finished early after that many steps (recorded in job.json)."""
    steps_done = spec.steps if stopped_at_step is None else stopped_at_step
    root = Path(spec.output_dir).expanduser()
    name = f"{slug(spec.prompt)}_seed{spec.seed}_{spec.method}_{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"
    with staged_folder(root, name) as staging:
        exported = bake_and_export(
            vertices.numpy(),
            faces.numpy(),
            color_fn,
            staging,
            texture_size=spec.texture_size,
            target_faces=TARGET_FACES,
            name=slug(spec.prompt),
            atlas=atlas,
        )
        texture_png = Path(exported["png"])
        with Image.open(texture_png) as image:
            events.texture(steps_done, texture_png.read_bytes(), image.width, image.height, True)
        render_preview(vertices.float(), faces, texture).save(staging / "preview.png")
        seconds = time.perf_counter() - start
        record = {
            "job": spec.to_json_dict(),
            "pipeline": spec.resolved_profile().to_dict(),  # the stages as run, overrides applied
            "seed": spec.seed,
            "stopped_at_step": stopped_at_step,
            "seconds": round(seconds, 2),
            "server_version": __version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": sys.platform,
            "files": {k: Path(v).name for k, v in exported.items() if isinstance(v, (str, Path))},
        }
        (staging / "job.json").write_text(json.dumps(record, indent=2))
    final = root / name
    glb = final / Path(exported["glb"]).name
    return JobResult(
        final,
        glb,
        final / Path(exported["obj"]).name,
        final / "preview.png",
        final / "job.json",
        seconds,
        steps_done / seconds,
        stopped_at_step,
    )
