"""Differentiable rendering: rasteriser, mesh rendering, cameras and shading."""
