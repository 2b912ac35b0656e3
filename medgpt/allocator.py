"""The memory allocator MedGPT's launchers start training processes with: tcmalloc, where it is installed.

PyTorch on a CPU allocates and frees tensors of many sizes at every step; glibc's malloc fragments under that
(the more the sizes vary: DPO batches of varying length grew a process from 1.3 to 2.1 GiB in 14 steps of
live memory that stayed the same) unless freed memory is handed back to the kernel, which then faults it in
again at the next step. tcmalloc (gperftools; PyTorch's own CPU launcher ``torch.backends.xeon.run_cpu``
offers it too) neither fragments nor faults: on the embedded model, SFT ran at the same speed in 1.26 instead
of 2.00 GiB, and DPO in 1.33 instead of 1.83 GiB (docs/benchmarks.md). It has to be loaded
before the process starts (LD_PRELOAD), so the launchers do it: the run_*.sh scripts (eval of this module's
output), run_pipeline.py for its stages, and the benchmarks for MedGPT's side. ``bash setup.sh`` installs it
(Debian/Ubuntu package libtcmalloc-minimal4) where it can; without it everything runs on glibc's malloc.
MEDGPT_ALLOCATOR=system keeps the system allocator.

No torch import here: the shell scripts call this before every stage.
"""

from __future__ import annotations

import ctypes.util
import os
import platform
import shlex
from pathlib import Path

TCMALLOC = "libtcmalloc_minimal.so.4"
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def tcmalloc_path() -> str | None:
    """The installed tcmalloc library, or None (not Linux, or not installed)."""
    if platform.system() != "Linux":
        return None
    for folder in LIBRARY_DIRS:
        if Path(folder, TCMALLOC).is_file():
            return str(Path(folder, TCMALLOC))
    found = ctypes.util.find_library("tcmalloc_minimal")
    return found if found and found.endswith(".so.4") else None


def preloaded() -> bool:
    """Whether this process runs on tcmalloc."""
    try:
        return "libtcmalloc" in Path("/proc/self/maps").read_text(errors="replace")
    except OSError:
        return False


def allocator_name() -> str:
    """The allocator this process runs on, for reports."""
    return "tcmalloc" if preloaded() else "system malloc"


def launch_env(env: dict | None = None) -> dict:
    """``env`` (default: this process's environment) for a training process: tcmalloc preloaded where it is
    installed, unless MEDGPT_ALLOCATOR=system or it is already there."""
    env = dict(os.environ if env is None else env)
    library = tcmalloc_path()
    preload = env.get("LD_PRELOAD", "")
    if library and env.get("MEDGPT_ALLOCATOR", "tcmalloc") != "system" and "tcmalloc" not in preload:
        env["LD_PRELOAD"] = f"{library} {preload}".strip()
    return env


def main() -> None:
    """Print the shell line that preloads tcmalloc (nothing where it does not apply): ``eval "$(python -m
    medgpt.allocator)"``."""
    env = launch_env()
    if env.get("LD_PRELOAD", "") != os.environ.get("LD_PRELOAD", ""):
        print(f"export LD_PRELOAD={shlex.quote(env['LD_PRELOAD'])}")


if __name__ == "__main__":
    main()
