"""Shared pytest fixtures. Heavy imports stay inside the fixtures so light test files start fast."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """One torch thread: the 2-core build machine is shared with a training job (BRIEF.md)."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Stable-Diffusion-like pipeline folder (unet, vae, text_encoder, tokenizer, scheduler)."""
    from server.priors.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_pixel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pixel-space variant (no vae/), laid out like the shipped shapes prior."""
    from server.priors.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny_pixel"), pixel_space=True)
