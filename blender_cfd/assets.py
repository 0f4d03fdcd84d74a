"""Keep a variant as an asset: marked in this file, with the job's preview as its thumbnail, the prompt
as its description, prior, method and seed as tags, filed under the catalog "CFD/<prompt>"; with an
asset library folder set, also written into its own .blend there (mesh, material, packed texture)
so every project's Asset Browser lists it and it drags into any scene.

Keeping is idempotent: marking twice is one asset, tags are not repeated, the library .blend of a
variant is rewritten in place (Blender writes it to a temporary file and renames it), and the catalog
file only ever gains the lines it lacks.
"""

from __future__ import annotations

import re
from pathlib import Path

import bpy
from bpy.app.handlers import persistent

from . import asset_catalogs, panel
from .addon import preferences

LIBRARY_NAME = "CFD Assets"  # how a kept-assets folder is listed among Blender's asset libraries


def asset_tags(obj: bpy.types.Object) -> list[str]:
    """What the Asset Browser can filter kept variants by: the prior, the method and the seed."""
    settings = obj.get("cfd_settings", {})
    return [str(settings.get("prior", "")), str(settings.get("method", "")), f"seed {obj['cfd_seed']}"]


def library_file(library: Path, obj: bpy.types.Object) -> Path:
    """`<library>/<variant name>.blend`, readable, with what Windows and macOS refuse in names replaced."""
    name = re.sub(r'[<>:"/\\|?*\x00-\x1f]', "-", obj.name).strip(" .") or "variant"
    return library / f"{name}.blend"


def catalog_folder(library: Path | None) -> Path | None:
    """Where the catalog file goes: the library folder, else beside the saved .blend (an unsaved file
    keeps its asset's catalog id; the catalog is written beside it when it is saved, `_on_save_post`)."""
    if library is not None:
        return library
    return Path(bpy.data.filepath).parent if bpy.data.filepath else None


def keep(obj: bpy.types.Object, library: Path | None) -> Path | None:
    """Mark `obj` as an asset (see the module's docstring); returns the library .blend written, if any."""
    if obj.asset_data is None:
        obj.asset_mark()
    data = obj.asset_data
    data.description = str(obj.get("cfd_prompt", ""))
    for tag in asset_tags(obj):
        if tag:
            data.tags.new(tag, skip_if_exists=True)
    preview_png = Path(obj.get("cfd_output", "")) / panel.PREVIEW_FILE
    if preview_png.is_file():
        panel.first_view(obj.preview_ensure(), preview_png)  # the job's own picture: no render needed
    else:  # a remote server's output folder is not on this machine
        obj.asset_generate_preview()
    path = asset_catalogs.catalog_path(str(obj.get("cfd_prompt", "")))
    folder = catalog_folder(library)
    data.catalog_id = (
        asset_catalogs.ensure_catalog(folder, path) if folder else asset_catalogs.catalog_id(path)
    )
    if library is None:
        return None
    library.mkdir(parents=True, exist_ok=True)
    blend = library_file(library, obj)
    bpy.data.libraries.write(str(blend), {obj}, path_remap="ABSOLUTE", compress=True)
    register_library(library)
    return blend


def register_library(folder: Path) -> None:
    """List the folder among Blender's asset libraries (Preferences › File Paths), once."""
    libraries = bpy.context.preferences.filepaths.asset_libraries
    if any(Path(bpy.path.abspath(lib.path)).resolve() == folder.resolve() for lib in libraries):
        return
    bpy.ops.preferences.asset_library_add(directory=str(folder))
    added = next(lib for lib in libraries if Path(lib.path).resolve() == folder.resolve())
    added.name = LIBRARY_NAME


@persistent
def _on_save_post(*_args) -> None:
    """The catalogs of the variants kept in this file, beside it (created or extended) once it is saved:
    an unsaved file has nowhere to keep them, and Blender writes only the catalogs it made itself."""
    folder = Path(bpy.data.filepath).parent if bpy.data.filepath else None
    kept = {
        str(obj["cfd_prompt"])
        for obj in bpy.data.objects
        if obj.asset_data is not None and "cfd_prompt" in obj
    }
    for prompt in sorted(kept) if folder is not None else ():
        asset_catalogs.ensure_catalog(folder, asset_catalogs.catalog_path(prompt))


def register() -> None:
    bpy.app.handlers.save_post.append(_on_save_post)


def unregister() -> None:
    if _on_save_post in bpy.app.handlers.save_post:
        bpy.app.handlers.save_post.remove(_on_save_post)


def library_folder() -> Path | None:
    """The asset library folder of the preferences, or None: keep in the current file only."""
    text = preferences().asset_library_dir.strip()
    return Path(bpy.path.abspath(text)) if text else None
