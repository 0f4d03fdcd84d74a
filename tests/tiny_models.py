"""Builders of tiny offline diffusers models for tests; they live in `server.priors.tiny` because the
`ddim-check` command uses them too. The session fixtures `tiny_sd_dir` / `tiny_pixel_dir` are in conftest."""

from server.priors.tiny import LATENT_SIZE, PIXEL_SIZE, build_tiny_sd, sd_scheduler, tiny_unet, tiny_vae

__all__ = ["LATENT_SIZE", "PIXEL_SIZE", "build_tiny_sd", "sd_scheduler", "tiny_unet", "tiny_vae"]
