"""Where the distillation noise eps_tilde comes from: fresh, world-map (FSD) or surface-attached (CFD)."""
