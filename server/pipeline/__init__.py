"""A job from settings to asset: set-up, the optimisation step, the loop, asset writing, the CLI."""
