"""The allocator MedGPT's launchers start training processes with (medgpt/allocator.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT


def test_launch_env_preloads_tcmalloc_once_unless_told_not_to(monkeypatch):
    import medgpt.allocator as allocator

    monkeypatch.setattr(allocator, "tcmalloc_path", lambda: "/lib/libtcmalloc_minimal.so.4")
    env = allocator.launch_env({"PATH": "/bin", "LD_PRELOAD": "/lib/other.so"})
    assert env["LD_PRELOAD"] == "/lib/libtcmalloc_minimal.so.4 /lib/other.so" and env["PATH"] == "/bin"
    assert allocator.launch_env(env) == env  # already there: not added twice
    assert "LD_PRELOAD" not in allocator.launch_env({"MEDGPT_ALLOCATOR": "system"})
    monkeypatch.setattr(allocator, "tcmalloc_path", lambda: None)
    assert "LD_PRELOAD" not in allocator.launch_env({})  # not installed: the system allocator


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="Linux only")
def test_a_process_started_with_the_launch_env_runs_on_tcmalloc_where_installed():
    from medgpt.allocator import launch_env, tcmalloc_path

    if tcmalloc_path() is None:
        pytest.skip("tcmalloc is not installed here (bash setup.sh installs libtcmalloc-minimal4 where it can)")
    probe = "import sys; sys.path.insert(0, sys.argv[1]); from medgpt.allocator import allocator_name; print(allocator_name())"
    env = launch_env({**os.environ, "LD_PRELOAD": ""})
    started = subprocess.run([sys.executable, "-c", probe, str(ROOT)], capture_output=True, text=True, env=env, check=True)
    plain = subprocess.run([sys.executable, "-c", probe, str(ROOT)], capture_output=True, text=True, check=True,
                           env={**os.environ, "LD_PRELOAD": ""})
    assert started.stdout.strip() == "tcmalloc" and plain.stdout.strip() == "system malloc"
    shell = subprocess.run([sys.executable, "-m", "medgpt.allocator"], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "LD_PRELOAD": ""}, check=True)
    assert shell.stdout.startswith("export LD_PRELOAD=") and "tcmalloc" in shell.stdout
