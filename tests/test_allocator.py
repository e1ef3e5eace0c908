import subprocess
import sys

import pytest

from vitup_cli.allocator import _glibc, tune_malloc

glibc_only = pytest.mark.skipif(_glibc() is None, reason="glibc's mallopt only")

# a decoder-shaped MLP over 12,544 queries (a 77 MB hidden activation per pass), warmed up, then ten
# passes; prints the minor page faults those ten took
_CHURN = """
import resource, sys
from vitup_cli.allocator import tune_malloc
if sys.argv[1] == "tuned":
    assert tune_malloc()
import torch
torch.set_num_threads(1)
x = torch.randn(12544, 384)
up, down = torch.nn.Linear(384, 1536), torch.nn.Linear(1536, 384)
with torch.inference_mode():
    for _ in range(2):
        down(torch.nn.functional.gelu(up(x)))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        down(torch.nn.functional.gelu(up(x))) + x
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, env: dict | None = None) -> int:
    done = subprocess.run([sys.executable, "-c", _CHURN, mode], capture_output=True, text=True, check=True, env=env)
    return int(done.stdout.strip())


@glibc_only
def test_tuned_malloc_reuses_large_blocks_instead_of_faulting_them_in_again():
    default, tuned = _faults("default"), _faults("tuned")
    # default: each pass mmaps its two 77 MB activations afresh (~18,800 pages each with 4 KiB pages, 390k
    # faults measured; fewer where the kernel backs them with huge pages); tuned: reused (9 measured)
    assert default > 1_000
    assert tuned < default / 4


def test_vitup_malloc_default_turns_it_off(monkeypatch):
    monkeypatch.setenv("VITUP_MALLOC", "default")
    assert tune_malloc() is False


@glibc_only
def test_the_vitup_command_tunes_and_the_library_does_not():
    probe = (
        "import vitup_cli.allocator as a\n"
        "calls = []\n"
        "a.tune_malloc = lambda *x: calls.append(1) or True\n"
        "import vitup_cli.cli as cli, vitup_cli.extract, vitup_cli.features, vitup_cli.probe.run\n"
        "print(len(calls))\n"
        "cli.app = lambda: print(len(calls))\n"
        "cli.main()\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["0", "1"]  # importing changes nothing; the command tunes once
