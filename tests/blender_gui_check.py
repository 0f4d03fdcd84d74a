"""Optional end-to-end check: the extension in a real Blender window, screenshots of each panel state.

    sudo .venv/bin/python tests/blender_gui_check.py OUT_DIR

Builds the extension zip, starts the real server outside Blender on loopback TCP (the shipped shapes
prior, Draft jobs), and runs /work/shared/tools/blender_gui.sh: Debian's Blender 4.3 in a chroot under Xvfb,
driven by tests/blender_gui_driver.py. The chroot and this machine share one folder at the same
path (a bind mount on /tmp/cfdgui), so the asset paths the server reports resolve in Blender too.
Needs root (chroot, mount); the first run builds the chroot (about 4 minutes). The shots, in the
factory startup scene: idle, empty prompt, running, first result, variants, the two variants kept
into an asset library folder and shown in the Asset Browser, server killed.

blender_gui.sh gives the driver 60 seconds; two real Draft jobs beside Blender's software GL take
about 3 minutes, so the check runs a copy of it that waits up to GUI_WAIT_S (the whole check
took 5 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
GUI_SCRIPT = Path("/work/shared/tools/blender_gui.sh")
SHARED = Path("/tmp/cfdgui")  # the same path inside the chroot and out here
GUI_WAIT_S = 900  # real Draft jobs take minutes on a CPU; the shared script's own wait is 60 s
CFD_TAB = (1175, 244)  # screen pixels of the CFD sidebar tab (Blender 4.3, factory layout, 1440x900)


def build_zip(out: Path) -> Path:
    sys.path.insert(0, str(TESTS))
    from test_blender_extension import blender_ext

    result = blender_ext("build", "--source-dir", str(ROOT), "--output-dir", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    return next(out.glob("blender_cfd-*.zip"))


def share_with_chroot(chroot: Path) -> None:
    tmp = chroot / "tmp"
    if subprocess.run(["mountpoint", "-q", str(tmp)]).returncode != 0:
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(tmp)], check=True)
    (tmp / "cfdgui").mkdir(exist_ok=True)
    if subprocess.run(["mountpoint", "-q", str(tmp / "cfdgui")]).returncode != 0:
        subprocess.run(["mount", "--bind", str(SHARED), str(tmp / "cfdgui")], check=True)


def start_server(token: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)]), "OMP_WAIT_POLICY": "PASSIVE"}
    command = [
        sys.executable, "-m", "server", "serve", "--listen", "127.0.0.1:0", "--token", token,
        "--output-root", str(SHARED / "assets"),
    ]  # fmt: skip
    server = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    for line in server.stderr:
        if line.startswith("{") and "listening" in line:
            threading.Thread(target=server.stderr.read, daemon=True).start()  # keep its log from blocking it
            return server, json.loads(line)["listening"]
    raise RuntimeError("the server did not announce its address")


def gui_script(folder: Path) -> Path:
    """The shared script, waiting up to GUI_WAIT_S for the driver's last screenshot instead of 60 s."""
    text = GUI_SCRIPT.read_text()
    polls = "seq 1 120"
    if polls not in text:
        raise RuntimeError(f"{GUI_SCRIPT} changed: its wait for /shot.request is no longer '{polls}'")
    script = folder / "blender_gui.sh"
    script.write_text(text.replace(polls, f"seq 1 {GUI_WAIT_S * 2}"))
    return script


def main(out: Path) -> int:
    chroot = Path(os.environ.get("BLENDER_CHROOT", Path.home() / ".cache" / "blender-trixie"))
    if not (chroot / "usr" / "bin" / "blender").exists():
        print("building the Blender chroot first (about 4 minutes)", flush=True)
        # The script builds the chroot on first use, then stops at the (empty) zip: all we need here.
        subprocess.run(["bash", str(GUI_SCRIPT), "/dev/null", "/dev/null", "/dev/null"], check=False)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(SHARED, ignore_errors=True)
    (SHARED / "shots").mkdir(parents=True)
    share_with_chroot(chroot)
    token = secrets.token_urlsafe(16)
    server, address = start_server(token)
    try:
        config = {"address": address, "token": token, "assets": str(SHARED / "assets"),
                  "shots": str(SHARED / "shots"), "tab": CFD_TAB, "server_pid": server.pid}  # fmt: skip
        (SHARED / "config.json").write_text(json.dumps(config))
        extension = build_zip(out)
        subprocess.run(
            [
                "bash",
                str(gui_script(SHARED)),
                str(extension),
                str(TESTS / "blender_gui_driver.py"),
                str(out / "final.png"),
            ],
            check=True,
        )
    finally:
        server.terminate()
        server.wait(10)
        subprocess.run(["umount", str(chroot / "tmp" / "cfdgui")], check=False)
    for shot in sorted((SHARED / "shots").iterdir()):
        shutil.copy(shot, out / shot.name)
        print(out / shot.name)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "gui_check")))
