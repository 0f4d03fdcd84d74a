"""Geometry of the orbit-rig gizmo: the shell of camera positions the optimiser samples from.

Cameras sit at eye = r (cos e cos a, cos e sin a, sin e) (`server/render/cameras.py`), so the set of
positions for e in [e0, e1] and r in [r0, r1] is a band of a thick spherical shell. Its wireframe
(rings at both elevations on both radii, meridians, and radial struts) shows that range at a glance.
"""

from __future__ import annotations

import numpy as np

RING_SEGMENTS = 48
MERIDIANS = 8
ARC_SEGMENTS = 8


def _orbit_points(elevation_deg: np.ndarray, azimuth_deg: np.ndarray, radius: float) -> np.ndarray:
    e, a = np.radians(elevation_deg), np.radians(azimuth_deg)
    return radius * np.stack([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)], axis=-1)


def rig_wireframe(
    elevation_deg: tuple[float, float], radius: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Vertices [V, 3] and edges [E, 2] of the camera band, centred on the rig's origin."""
    vertices: list[np.ndarray] = []
    edges: list[np.ndarray] = []

    def polyline(points: np.ndarray, closed: bool) -> None:
        start = sum(len(v) for v in vertices)
        index = np.arange(len(points)) + start
        pairs = np.stack([index[:-1], index[1:]], axis=1)
        if closed:
            pairs = np.concatenate([pairs, [[index[-1], index[0]]]])
        vertices.append(points)
        edges.append(pairs)

    ring_azimuths = np.linspace(0.0, 360.0, RING_SEGMENTS, endpoint=False)
    meridian_azimuths = np.linspace(0.0, 360.0, MERIDIANS, endpoint=False)
    arc = np.linspace(elevation_deg[0], elevation_deg[1], ARC_SEGMENTS + 1)
    for r in sorted(set(radius)):
        for elevation in sorted(set(elevation_deg)):
            polyline(_orbit_points(np.full(RING_SEGMENTS, elevation), ring_azimuths, r), closed=True)
        if elevation_deg[1] > elevation_deg[0]:
            for azimuth in meridian_azimuths:
                polyline(_orbit_points(arc, np.full(len(arc), azimuth), r), closed=False)
    if radius[1] > radius[0]:
        for elevation in sorted(set(elevation_deg)):
            for azimuth in meridian_azimuths:
                inner = _orbit_points(np.array([elevation]), np.array([azimuth]), radius[0])
                outer = _orbit_points(np.array([elevation]), np.array([azimuth]), radius[1])
                polyline(np.concatenate([inner, outer]), closed=False)
    return np.concatenate(vertices), np.concatenate(edges)
