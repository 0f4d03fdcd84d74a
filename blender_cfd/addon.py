"""The add-on's identity and the accessors every Blender module needs: its preferences, its user folder.

A module of its own so that the preferences, the operators and the session can all reach them
without importing one another.
"""

from __future__ import annotations

from pathlib import Path

import bpy

# The extension is the package one level up (`bl_ext.<repo>.blender_cfd`): preferences and the
# user folder are keyed by it. Outside Blender (tests of the format modules) this is just our name.
ADDON_ID = __package__.rpartition(".")[0] or __package__


def user_folder(path: str, create: bool = True) -> Path:
    """A folder of ours under Blender's per-extension user directory (never the extension folder)."""
    return Path(bpy.utils.extension_path_user(ADDON_ID, path=path, create=create))


def preferences() -> bpy.types.AddonPreferences:
    """The add-on's preferences (`preferences.CFDPreferences`)."""
    return bpy.context.preferences.addons[ADDON_ID].preferences
