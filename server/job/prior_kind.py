"""Which model family a job's `prior` names, decided offline from the name and the files on disk.

stdlib only: the job's default pipeline profile (`server.job.profiles`) and Blender's panel need it
without torch; `server.priors.mvdream.is_mvdream` adds the hub-cache look-up for hub ids.
"""

from __future__ import annotations

import json
from pathlib import Path

ORIGINAL_REPO = "MVDream/MVDream"
ORIGINAL_FILE = "sd-v2.1-base-4view.pt"
MULTIVIEW_CLASS = "MultiViewUNetModel"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")


def is_multiview_config(path: Path) -> bool:
    return path.is_file() and json.loads(path.read_text()).get("_class_name") == MULTIVIEW_CLASS


def checkpoints_in(folder: Path) -> list[Path]:
    found = [p for p in folder.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES]
    return sorted(found, key=lambda p: (p.name != ORIGINAL_FILE, p.name))  # the SD 2.1 checkpoint first


def local_mvdream(spec: str) -> bool | None:
    """Whether `spec` names MVDream as far as its name and local files tell: "mvdream", a checkpoint
    file (.pt, .ckpt, ...), a folder holding a MultiViewUNetModel (unet/config.json) or, without
    unet/, an original checkpoint, or the original hub repository; None for a hub id, which only its
    cached config can decide."""
    if spec in ("mvdream", ORIGINAL_REPO):
        return True
    path = Path(spec).expanduser()
    if path.suffix in CHECKPOINT_SUFFIXES and not path.is_dir():  # even a missing one: MVDream's error
        return True
    if path.is_dir():
        config = path / "unet" / "config.json"  # decides alone: SD repositories also hold .ckpt files
        return is_multiview_config(config) if config.is_file() else bool(checkpoints_in(path))
    if spec.count("/") != 1 or spec.startswith((".", "~", "/")):
        return False
    return None
