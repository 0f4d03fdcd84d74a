"""The distillation update shared by SDS, FSD and CFD, its schedules, the clean flow and the DDIM check."""
