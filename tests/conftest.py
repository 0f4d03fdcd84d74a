"""Shared pytest fixtures. Heavy imports stay inside the fixtures so light test files start fast."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXTENSION = "blender_cfd_ext"  # the name the repository root is imported under in tests


def import_extension() -> None:
    """The repository root as the package `blender_cfd_ext`, as Blender imports the extension
    (`bl_ext.<repo>`): the add-on's modules then reach the server's as `..server`."""
    if EXTENSION in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        EXTENSION, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    sys.modules[EXTENSION] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules[EXTENSION])


def pytest_configure(config: pytest.Config) -> None:
    """One torch thread: the 2-core build machine is shared with a training job (BRIEF.md)."""
    import torch

    torch.set_num_threads(1)
    import_extension()


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Stable-Diffusion-like pipeline folder (unet, vae, text_encoder, tokenizer, scheduler)."""
    from server.testing.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_pixel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pixel-space variant (no vae/), laid out like the shipped shapes prior."""
    from server.testing.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny_pixel"), pixel_space=True)


@pytest.fixture(scope="session")
def ray_address():
    """One local Ray instance of 2 CPUs for the whole session (it takes seconds to start); its address
    lets a `python -m server batch --ray ADDRESS` child join it as a driver joins a cluster."""
    import ray

    from server.batch.cluster import connect

    connect("local", threads=1, num_cpus=2)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
