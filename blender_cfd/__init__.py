"""The Blender side of blender-cfd: sidebar panel, operators, and the session with the server.

Never imports torch: generation runs in a separate server process (`server/`, shipped beside this
package) that streams meshes and textures back. The format-only modules (`glb`, `jobs`,
`camera_rig`, `environment`, `asset_catalogs`) import without bpy, so plain pytest can test them; the Blender
modules are imported in `register()`.
"""


def _modules():
    from . import assets, environment_ui, operators, panel, preferences, props, session

    return (props, preferences, environment_ui, operators, panel, session, assets)


def register() -> None:
    for module in _modules():
        module.register()


def unregister() -> None:
    for module in reversed(_modules()):
        module.unregister()
