"""The book's one entry point: set up, open the notebooks, run the tests, regenerate outputs.

    python book.py lab          set everything up, then open JupyterLab on chapters/
    python book.py test         set everything up, then run every test, notebooks included
    python book.py setup        only install what the book needs into this Python
    python book.py regenerate   re-execute notebooks in place, as the tests execute them

It uses only the standard library, so it runs before anything is installed. It installs
into the Python that runs it (activate a virtual environment first if you want one),
keeps a torch you already have, and never pulls CUDA packages onto a machine without an
NVIDIA GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CHAPTERS = ROOT / "chapters"
REQUIREMENTS = ROOT / "requirements.txt"
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
MIN_PYTHON = (3, 11)

# The environment every notebook kernel runs in, under test and when regenerated: one
# thread (repeatable numbers, notebooks side by side) and the CPU, so committed outputs
# are what any CPU machine prints.
TEST_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MLLM_DEVICE": "cpu",
    "PYTHONHASHSEED": "0",
    "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    "TQDM_DISABLE": "1",
}


def say(msg: str) -> None:
    print(f"[book] {msg}", flush=True)


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    say(" ".join(cmd[2:]))
    subprocess.run(cmd, check=True)


def requirement_lines() -> list[str]:
    lines = []
    for raw in REQUIREMENTS.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def has_nvidia_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True
    ).returncode == 0


def ensure_torch(torch_req: str) -> None:
    """Keep an installed torch; otherwise install the build that suits this machine."""
    if importlib.util.find_spec("torch") is not None:
        import importlib.metadata as md

        version = md.version("torch")
        minimum = re.search(r">=\s*([\d.]+)", torch_req)
        if minimum and tuple(int(x) for x in re.findall(r"\d+", version)[:2]) < tuple(
            int(x) for x in minimum.group(1).split(".")[:2]
        ):
            say(f"keeping your torch {version}; the book was tested with {torch_req} (upgrade it if something fails)")
        else:
            say(f"keeping your torch {version}")
        return
    pinned = torch_req.replace(">=", "==")  # the tested version: its CPU build exists on every index
    if platform.system() == "Linux" and not has_nvidia_gpu():
        # PyPI's Linux torch pulls several GB of CUDA libraries; the CPU build does not.
        say("no NVIDIA GPU found: installing the CPU build of torch")
        pip("install", "--retries", "1", "--timeout", "30", pinned, "--extra-index-url", CPU_TORCH_INDEX)
    else:
        pip("install", pinned)


def setup() -> None:
    """Install the book's dependencies and the package itself (editable) into this Python."""
    if sys.version_info < MIN_PYTHON:
        sys.exit(f"[book] Python {platform.python_version()} is too old: the book needs {'.'.join(map(str, MIN_PYTHON))} or newer")
    reqs = requirement_lines()
    torch_req = next(r for r in reqs if re.match(r"torch\b", r))
    ensure_torch(torch_req)
    others = [r for r in reqs if r is not torch_req]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(others) + "\n")
    try:
        pip("install", "--quiet", "-r", f.name)
    finally:
        os.unlink(f.name)
    # --no-deps: the requirements are in already, and pip must not touch the torch we kept.
    pip("install", "--quiet", "--no-deps", "-e", str(ROOT))
    say("setup done")


def test(pytest_args: list[str], workers: int | None) -> int:
    """Run the unit tests and execute every notebook (nbval), notebooks in parallel."""
    n = workers or max(1, os.cpu_count() or 1)
    env = {**os.environ, **TEST_ENV}
    cmd = [sys.executable, "-m", "pytest", "-n", str(n), "--dist", "loadfile", *pytest_args]
    say(" ".join(cmd[2:]))
    start = time.perf_counter()
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    say(f"tests finished in {time.perf_counter() - start:.0f} s with exit code {rc}")
    return rc


def regenerate(notebooks: list[str], timeout: int) -> None:
    """Execute notebooks top to bottom in a fresh kernel and save their outputs in place."""
    os.environ.update(TEST_ENV)
    import nbformat
    from nbclient import NotebookClient

    # default: the chapters in order, then the appendices (A1_..., A2_...), which may load what chapters ship
    paths = [Path(p).resolve() for p in notebooks] or [
        *sorted(CHAPTERS.glob("[0-9][0-9]_*.ipynb")), *sorted(CHAPTERS.glob("A[0-9]_*.ipynb"))]
    for path in paths:
        if not path.is_file() or path.suffix != ".ipynb":
            sys.exit(f"[book] {path} is not a notebook file (expected chapters/NN_name.ipynb or chapters/AN_name.ipynb)")
        say(f"executing {path.relative_to(ROOT)}")
        start = time.perf_counter()
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(
            nb,
            timeout=timeout,
            kernel_name="python3",
            record_timing=False,
            resources={"metadata": {"path": str(path.parent)}},
        )
        client.execute()  # raises on an unexpected error, so a broken notebook is never saved
        nb.metadata.pop("widgets", None)
        nbformat.write(nb, path)
        say(f"  saved in {time.perf_counter() - start:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("setup", help="install what the book needs into this Python")
    lab = sub.add_parser("lab", help="set up, then open JupyterLab on chapters/")
    lab.add_argument("--no-setup", action="store_true", help="skip the install step")
    t = sub.add_parser("test", help="set up, then run the unit tests and every notebook")
    t.add_argument("--no-setup", action="store_true", help="skip the install step")
    t.add_argument("--workers", type=int, default=None, help="parallel test workers (default: one per CPU core)")
    t.add_argument("pytest_args", nargs=argparse.REMAINDER, help="extra arguments for pytest, after --")
    r = sub.add_parser("regenerate", help="re-execute notebooks in place (all chapters, then the appendices, by default)")
    r.add_argument("notebooks", nargs="*", help="notebook paths (default: every chapters/NN_*.ipynb, then every chapters/AN_*.ipynb)")
    r.add_argument("--timeout", type=int, default=600, help="seconds allowed per cell")
    args = parser.parse_args(argv)

    if args.command == "setup":
        setup()
    elif args.command == "lab":
        if not args.no_setup:
            setup()
        cmd = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={CHAPTERS}"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")  # containers often run as root; JupyterLab refuses without this
        say(" ".join(cmd[1:]))
        return subprocess.run(cmd).returncode
    elif args.command == "test":
        if not args.no_setup:
            setup()
        extra = [a for a in args.pytest_args if a != "--"]
        return test(extra, args.workers)
    elif args.command == "regenerate":
        regenerate(args.notebooks, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
