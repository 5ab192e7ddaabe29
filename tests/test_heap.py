"""cvnet.models.heap: large freed tensors are reused without page faults; the switch turns it off."""
import os
import resource
import subprocess
import sys

import pytest
import torch

from cvnet.models.heap import ENV, keep_freed_memory
from cvnet.models.precision import precision_context

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc heap settings")

BLOCK = 64 << 20  # above glibc's largest mmap threshold (32 MiB): mapped per block by default


def faults_of_a_second_block() -> int:
    """Minor page faults of allocating and filling a BLOCK-sized tensor after equal ones were
    freed (ten before it: the heap first grows by a few blocks, as small blocks split freed ones)."""
    for _ in range(10):
        torch.ones(BLOCK // 4)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(BLOCK // 4)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_model_computation_keeps_freed_memory_for_the_next_tensor():
    with precision_context(torch.device("cpu"), "fp32"):  # what every model call runs under
        assert keep_freed_memory()  # already set (cached: the same answer)
    pages = BLOCK // os.sysconf("SC_PAGE_SIZE")
    assert faults_of_a_second_block() < pages // 10  # reused, not mapped and faulted in again


def test_switched_off_glibc_maps_each_block_anew():
    code = ("import sys; sys.path.insert(0, 'tests'); from test_heap import faults_of_a_second_block as f; "
            "from cvnet.models.heap import keep_freed_memory as k; print(k(), f())")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, ENV: "0"}, check=True,
                         capture_output=True, text=True).stdout.split()
    assert out[0] == "False"
    assert int(out[1]) > BLOCK // os.sysconf("SC_PAGE_SIZE") // 2  # every page faulted in again
