"""Blender loads the repository root as the extension `blender_cfd`; the add-on lives in `blender_cfd/`.

Imports happen inside register() so that importing this file outside Blender does nothing.
"""


def register() -> None:
    from . import blender_cfd

    blender_cfd.register()


def unregister() -> None:
    from . import blender_cfd

    blender_cfd.unregister()
