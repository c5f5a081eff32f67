"""dist.keep_freed_memory: freed CPU tensors are reused without page faults (glibc only; process-wide, so each
case runs in its own Python process)."""
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings are Linux-only")

PROBE = textwrap.dedent("""
    import resource, torch
    from mimkit.dist import init
    device = init("cpu")  # what every job does first
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(12):  # the heap settles after a few rounds (alignment leaves each hole a little short at first)
        torch.ones(16 * 2 ** 20)  # 64 MB, freed at once
    before = faults()
    for _ in range(10):
        torch.ones(16 * 2 ** 20)
    print(faults() - before)
""")


def faults_per_64mb_tensor(env: dict) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True)
    return int(out.stdout.split()[-1]) / 10


def test_freed_memory_is_reused_without_page_faults():
    # default malloc: a buffer over 32 MB is always mmap'd afresh and unmapped when freed (smaller ones too, until
    # its adaptive threshold catches up): ~16k faults of 4 KB pages per 64 MB tensor (fewer with huge pages)
    default = faults_per_64mb_tensor({"MIMKIT_KEEP_FREED_MEMORY": "0"})
    kept = faults_per_64mb_tensor({})
    assert default > 100 and kept < 10, (default, kept)
