"""The Blender side of blender-cfd: sidebar panel, operators, and the streaming job controller.

Never imports torch: generation runs in a separate server process (`server/`, shipped beside this
package) that streams meshes and textures back. The format-only modules (`glb`, `jobs`,
`camera_rig`, `environment`) import without bpy, so plain pytest can test them; the Blender
modules are imported in `register()`.
"""

# The extension is the package one level up (`bl_ext.<repo>.blender_cfd`): preferences and the
# user folder are keyed by it. Outside Blender (tests of the format modules) this is just our name.
ADDON_ID = __package__.rpartition(".")[0] or __package__


def _modules():
    from . import controller, operators, panel, preferences, props

    return (props, preferences, operators, panel, controller)


def register() -> None:
    for module in _modules():
        module.register()


def unregister() -> None:
    for module in reversed(_modules()):
        module.unregister()
