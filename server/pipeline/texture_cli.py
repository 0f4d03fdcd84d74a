"""`python -m server texture --mesh IN.glb --prompt "a red cube" --seed 0 --out DIR [--variants N]`:
texture an existing mesh headless, keeping it exactly.

Writes the same files as `generate` (GLB + OBJ + texture + preview PNG + job.json per variant, and a
grid of the variants' previews); the last line on stdout is the same JSON. GLB and OBJ files are Y up
(as Blender writes them) and are turned Z up for the job, then back on export, so the asset's
positions equal the input's bitwise. PLY files are taken as they are (Z up). The mesh's UVs are
baked into when it has them; `--unwrap` asks for a fresh unwrap instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import trimesh

from server.job.fixed_mesh import FixedMesh, MeshInputError
from server.pipeline import cli
from server.pipeline.export import Z_UP_TO_Y_UP
from server.pipeline.texture import run_texture_job

Y_UP_SUFFIXES = {".glb", ".gltf", ".obj"}
SUFFIXES = (*sorted(Y_UP_SUFFIXES), ".ply")


def load_mesh(path: Path) -> FixedMesh:
    """The mesh in a file, in the server's Z-up frame, with its UVs when it has them (all its parts
    merged, their node transforms applied)."""
    if path.suffix.lower() not in SUFFIXES:
        raise MeshInputError(
            "mesh", f"{path.name}: unsupported file type", f"give one of {', '.join(SUFFIXES)}"
        )
    if not path.is_file():
        raise MeshInputError("mesh", f"{path} does not exist", "give the path of a mesh file")
    try:
        mesh = trimesh.load(path, force="mesh", process=False)
    except Exception as error:
        raise MeshInputError(
            "mesh", f"{path.name} could not be read: {error}", "export the mesh again"
        ) from error
    vertices = np.asarray(mesh.vertices, np.float32)
    if path.suffix.lower() in Y_UP_SUFFIXES:
        vertices = (vertices @ Z_UP_TO_Y_UP.astype(np.float32)).astype(np.float32)  # the inverse rotation
    faces = np.asarray(mesh.faces)
    uv = getattr(mesh.visual, "uv", None)
    uvs = None if uv is None or len(uv) != len(vertices) else np.asarray(uv, np.float32)[faces]
    return FixedMesh.from_arrays(vertices, faces, uvs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mesh", type=Path, required=True, help=f"the mesh to texture ({', '.join(SUFFIXES)})"
    )
    parser.add_argument(
        "--unwrap", action="store_true", help="bake into a fresh UV unwrap instead of the mesh's own UVs"
    )
    cli.add_arguments(parser)


def main(args: argparse.Namespace) -> int:
    try:
        mesh = load_mesh(args.mesh)
    except MeshInputError as error:
        print(f"error: {error}; fix: {error.fix}", file=sys.stderr)
        return 2
    extra = {"kind": "texture", "uv_mode": "unwrap" if args.unwrap else "keep"}
    return cli.run_variants(
        args, extra, lambda spec, events, cancel: run_texture_job(spec, mesh, events, cancel)
    )
