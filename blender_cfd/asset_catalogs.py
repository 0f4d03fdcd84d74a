"""Blender's asset catalog file (`blender_assets.cats.txt`), read and extended without bpy.

Blender keeps a library's catalogs in this text file at the library's root: one line per catalog,
`UUID:path/of/catalog:simple name`. Keep adds the catalogs "CFD" and "CFD/<prompt>" to it; lines
already there (the artist's own catalogs, or an earlier Keep's) stay as they are, so the file is
created or extended, never overwritten. A catalog's UUID derives from its path, so one prompt files
into the same catalog in every library (an existing line for that path keeps its own UUID).
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

CATALOG_FILE = "blender_assets.cats.txt"
ROOT_CATALOG = "CFD"
HEADER = """# This is an Asset Catalog Definition file for Blender.
#
# Empty lines and lines starting with `#` will be ignored.
# The first non-ignored line should be the version indicator.
# Other lines are of the format "UUID:catalog/path/for/assets:simple catalog name"

VERSION 1

"""
NAMESPACE = uuid.UUID("6c3f1a52-3b9e-4d0e-9a57-2f8d1c0b7e41")  # this add-on's catalogs, by path
PATH_LIMIT = 60  # characters of the prompt in a catalog path: the Asset Browser's tree stays readable


def catalog_path(prompt: str) -> str:
    """'CFD/<prompt>': the prompt cleaned of what the file format and catalog paths reserve."""
    text = re.sub(r"[:/\\]+", "-", " ".join(prompt.split())).strip(" -.")[:PATH_LIMIT].strip()
    return f"{ROOT_CATALOG}/{text or 'untitled'}"


def simple_name(path: str) -> str:
    """Blender's "simple name" of a catalog: its path with dashes (stored in each asset, for recovery)."""
    return path.replace("/", "-")


def catalog_id(path: str) -> str:
    return str(uuid.uuid5(NAMESPACE, path))


def read_catalogs(text: str) -> dict[str, str]:
    """Catalog path -> UUID of every catalog line of a catalog file's text."""
    catalogs = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line.startswith("VERSION"):
            continue
        parts = line.split(":", 2)
        if len(parts) >= 2:
            catalogs.setdefault(parts[1], parts[0])
    return catalogs


def ensure_catalog(folder: Path, path: str) -> str:
    """The UUID of catalog `path` (and its parents) in the folder's catalog file, adding the lines that
    are missing; the file is written whole to a temporary name and then moved into place."""
    file = Path(folder) / CATALOG_FILE
    text = file.read_text(encoding="utf-8") if file.is_file() else HEADER
    catalogs = read_catalogs(text)
    parts = path.split("/")
    missing = [
        "/".join(parts[: depth + 1])
        for depth in range(len(parts))
        if "/".join(parts[: depth + 1]) not in catalogs
    ]
    if missing:
        lines = [f"{catalog_id(p)}:{p}:{simple_name(p)}" for p in missing]
        text = text + ("" if text.endswith("\n") else "\n") + "\n".join(lines) + "\n"
        Path(folder).mkdir(parents=True, exist_ok=True)
        partial = file.with_name(f".{CATALOG_FILE}.partial")
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, file)
        catalogs.update({p: catalog_id(p) for p in missing})
    return catalogs[path]
