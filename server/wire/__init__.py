"""What crosses between Blender and the server: protocol v1 frames and the client that speaks them.

stdlib + numpy only, and relative imports only: the Blender extension imports this package as
`<extension>.server.wire`, where there is no top-level `server`.
"""
