"""The blender-cfd generation server.

This package must stay importable without torch: Blender imports `server.wire.protocol` from it.
"""

__version__ = "0.1.0"
