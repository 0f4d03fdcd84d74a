"""The server's Python environment: where it is, what it has, and how to create it on request.

No bpy here: the operators pass in paths and Blender's online-access flag. The server always runs
from this extension's own folder (cwd and PYTHONPATH), so its code matches the extension version
whichever interpreter runs it. Setting up never happens on its own: only the "Set up environment"
button calls `setup_commands`, and only when Blender allows online access.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

EXTENSION_ROOT = Path(__file__).resolve().parent.parent  # holds server/ and requirements.txt
REQUIREMENTS = EXTENSION_ROOT / "requirements.txt"
# module=distribution (when the names differ) of what the server imports
REQUIRED_PACKAGES = (
    "numpy",
    "torch",
    "diffusers",
    "transformers",
    "trimesh",
    "xatlas",
    "scipy",
    "PIL=pillow",
)
# Where an installed NVIDIA driver shows itself (Linux, Windows): then the CUDA build of torch can run.
NVIDIA_DRIVER_FILES = (
    Path("/proc/driver/nvidia/version"),
    Path(os.environ.get("SYSTEMROOT", "C:/Windows")) / "System32" / "nvcuda.dll",
)
TORCH_INDEX = {
    "CUDA": "https://download.pytorch.org/whl/cu128",
    "CPU": "https://download.pytorch.org/whl/cpu",
}

# Run by the server's interpreter: which packages are installed (without importing them: fast), and
# what torch, the one import that must really work, can see. Prints one JSON line.
PROBE = """
import importlib, importlib.metadata, importlib.util, json, platform, sys
report = {"python": platform.python_version(), "executable": sys.executable, "packages": {}}
for entry in sys.argv[1:]:
    module, _, distribution = entry.partition("=")
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    try:
        version = importlib.metadata.version(distribution or module) if found else None
    except importlib.metadata.PackageNotFoundError:
        version = "installed"
    report["packages"][module] = version
try:
    torch = importlib.import_module("torch")
    report["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    if torch.cuda.is_available():
        report["device"] = "cuda"
        report["device_name"] = torch.cuda.get_device_name(0)
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        report["device"], report["device_name"] = "mps", "Apple GPU"
    else:
        report["device"], report["device_name"] = "cpu", "CPU"
except Exception as error:
    report["torch_error"] = f"{type(error).__name__}: {error}"
print(json.dumps(report))
"""


def device_label(device: str, device_name: str = "") -> str:
    """What people call the device a server runs on: "CPU", "Apple GPU", or the GPU's own name
    (a server's CPU name is its machine architecture, such as "x86_64", which says nothing)."""
    return {"cpu": "CPU", "mps": "Apple GPU"}.get(device) or device_name or device.upper()


def venv_python(venv_dir: Path) -> Path:
    """The interpreter of a virtual environment on this platform."""
    if os.name == "nt":
        return venv_dir / "Scripts" / "python.exe"
    return venv_dir / "bin" / "python"


def resolve_python(configured: str, default_venv: Path) -> Path | None:
    """The interpreter preferences name, else the set-up venv's if it exists, else None."""
    if configured.strip():
        return Path(configured.strip()).expanduser()
    candidate = venv_python(default_venv)
    return candidate if candidate.exists() else None


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else all of them)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 2


def server_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the server: our folder first on PYTHONPATH, unbuffered, half the CPU threads.

    Half the usable logical CPUs (one per physical core on most machines) leaves Blender's UI its own
    cores, so the server's OpenMP threads may spin between ops, which is what makes a CPU job fast:
    on 2 cores, the demo job took 38 s with one spinning thread against 66 s with two polite
    (OMP_WAIT_POLICY=PASSIVE) ones. A user's OMP_NUM_THREADS / OMP_WAIT_POLICY still win.
    """
    env = dict(os.environ if base is None else base)
    paths = [str(EXTENSION_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", str(max(1, usable_cpus() // 2)))
    return env


@dataclass
class EnvironmentReport:
    """What "Check environment" found; `problem` and `fix` are set when the server cannot run."""

    python: Path | None
    ok: bool = False
    python_version: str = ""
    packages: dict[str, str | None] = field(default_factory=dict)
    torch: str = ""
    cuda: str | None = None
    device: str = ""
    device_name: str = ""
    problem: str = ""
    fix: str = ""

    @property
    def missing(self) -> list[str]:
        return [name for name, version in self.packages.items() if version is None]

    def lines(self) -> list[str]:
        if not self.ok:
            return [self.problem, self.fix]
        return [
            f"Python {self.python_version} ({self.python})",
            f"torch {self.torch}, CUDA {self.cuda or 'not available'}",
            f"device: {device_label(self.device, self.device_name)}",
        ]


def probe(python: Path | None, timeout: float = 120.0) -> EnvironmentReport:
    """Run the probe in the server's interpreter; never raises, the report says what went wrong."""
    report = EnvironmentReport(python)
    setup_fix = "Pick the interpreter in the extension's preferences, or click Set up Environment"
    if python is None:
        report.problem, report.fix = "No server environment is set up yet", setup_fix
        return report
    if not python.exists():
        report.problem, report.fix = f"Python interpreter not found: {python}", setup_fix
        return report
    try:
        result = subprocess.run(
            [str(python), "-c", PROBE, *REQUIRED_PACKAGES],
            cwd=EXTENSION_ROOT,
            env=server_environment(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        report.problem, report.fix = f"Could not run {python}: {error}", setup_fix
        return report
    if result.returncode != 0 or not result.stdout.strip():
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        report.problem, report.fix = f"{python} failed: {tail}", setup_fix
        return report
    data = json.loads(result.stdout.strip().splitlines()[-1])
    report.python_version = data["python"]
    report.packages = data["packages"]
    report.torch = data["packages"].get("torch") or ""
    report.cuda = data.get("cuda")
    report.device = data.get("device", "")
    report.device_name = data.get("device_name", "")
    if report.missing:
        report.problem = f"Missing in {python}: {', '.join(report.missing)}"
        report.fix = "Click Set up Environment, or install requirements.txt into that environment"
        return report
    if "torch_error" in data:
        report.problem, report.fix = f"torch does not load: {data['torch_error']}", setup_fix
        return report
    report.ok = True
    return report


def default_torch_build(driver_files: tuple[Path, ...] = NVIDIA_DRIVER_FILES, which=shutil.which) -> str:
    """The build Set Up offers first: CUDA where an NVIDIA driver is installed, else the CPU build
    (a CUDA build without a driver is gigabytes of download that can only run on the CPU)."""
    found = any(path.exists() for path in driver_files) or which("nvidia-smi") is not None
    return "CUDA" if found else "CPU"


def torch_requirement(requirements: Path = REQUIREMENTS) -> str:
    """The pinned torch line of the server's requirements (installed first, from the right index)."""
    for line in requirements.read_text().splitlines():
        if line.strip().startswith("torch"):
            return line.split("#")[0].strip()
    return "torch"


def setup_commands(
    venv_dir: Path, build: str, base_python: Path | None = None, requirements: Path = REQUIREMENTS
) -> list[list[str]]:
    """The commands "Set up environment" runs: venv, then torch (CUDA or CPU build), then the rest."""
    python = venv_python(venv_dir)
    torch_install = [str(python), "-m", "pip", "install", torch_requirement(requirements)]
    if build in TORCH_INDEX and sys.platform != "darwin":  # macOS wheels on PyPI already use Metal
        torch_install += ["--index-url", TORCH_INDEX[build]]
    return [
        [str(base_python or Path(sys.executable)), "-m", "venv", str(venv_dir)],
        [str(python), "-m", "pip", "install", "--upgrade", "pip"],
        torch_install,
        [str(python), "-m", "pip", "install", "-r", str(requirements)],
    ]


class CommandRunner(threading.Thread):
    """Runs commands one after another off the main thread, keeping a log and the last lines."""

    def __init__(self, commands: list[list[str]], log_path: Path):
        super().__init__(daemon=True)
        self.commands = commands
        self.log_path = log_path
        self.tail: list[str] = []
        self.returncode: int | None = None
        self._lock = threading.Lock()

    def run(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("w", encoding="utf-8") as log:
            for command in self.commands:
                self._add(f"$ {' '.join(command)}", log)
                try:
                    process = subprocess.Popen(
                        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
                    )
                except OSError as error:
                    self._add(f"could not start: {error}", log)
                    self.returncode = -1
                    return
                for line in process.stdout:
                    self._add(line.rstrip(), log)
                if process.wait() != 0:
                    self.returncode = process.returncode
                    return
        self.returncode = 0

    def _add(self, line: str, log) -> None:
        log.write(line + "\n")
        log.flush()
        with self._lock:
            self.tail = ([*self.tail, line])[-6:]

    def last_lines(self) -> list[str]:
        with self._lock:
            return list(self.tail)
