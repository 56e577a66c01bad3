"""The ``nir`` process keeps freed memory for the next step (glibc's mallopt), unless told otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nir_lightning.app import allocator


def test_the_thresholds_are_set_on_linux_glibc(monkeypatch) -> None:
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    if not sys.platform.startswith("linux"):
        assert allocator.keep_freed_memory() is False
        return
    assert allocator.keep_freed_memory() is True


@pytest.mark.parametrize("name", ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"])
def test_the_users_own_malloc_tuning_wins(monkeypatch, name: str) -> None:
    monkeypatch.setenv(name, "65536")
    assert allocator.keep_freed_memory() is False


def test_other_platforms_are_left_alone(monkeypatch) -> None:
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.keep_freed_memory() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_a_steps_large_blocks_are_reused_without_new_page_faults() -> None:
    """What the setting is for: a step that allocates and frees the same large tensors (the finest
    grid's gradient, 15 MB, and a lattice read's, 6 MB) faults few of their pages in again with the
    thresholds set; by default, often most of them."""
    code = (
        "import resource, sys, torch\n"
        "from nir_lightning.app.allocator import keep_freed_memory\n"
        "if sys.argv[1] == 'on': assert keep_freed_memory()\n"
        "def step():\n"
        "    a = torch.zeros(4, 97, 97, 97); b = torch.zeros(4, 40, 97, 97); c = a + 1; d = b * 2\n"
        "    return float(c[0, 0, 0, 0] + d[0, 0, 0, 0])\n"
        "for _ in range(3): step()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(10): step()\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    faults = {
        mode: float(subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True, env=env).stdout)
        for mode in ("off", "on")
    }
    pages = 2 * (4 * 97**3 + 4 * 40 * 97**2) * 4 // 4096  # the step's four tensors
    # without the setting glibc's own threshold sometimes reuses the blocks too (5,000 faults a
    # step in one run, 600 in another), so only the setting's side is asserted: the pages reused
    assert faults["on"] < pages / 4, faults
