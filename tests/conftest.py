import os

import pytest
import torch

# A test that wants a real (offline) W&B run turns it on itself (tests/qat/test_monitor_wandb.py);
# everywhere else an installed wandb would start a run per QAT log folder, slowly.
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: a second intra-op thread only adds contention on a shared 2-core machine.
    Use per module with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def flip_bytes():
    """``flip_bytes(path, offset, n=64)``: invert ``n`` bytes of the file from ``offset`` (damage it)."""
    def flip(path, offset, n=64):
        raw = bytearray(path.read_bytes())
        for i in range(offset, offset + n):
            raw[i] ^= 0xFF
        path.write_bytes(bytes(raw))
    return flip
