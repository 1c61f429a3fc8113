"""An epoch counter that DataLoader worker processes see change.

Workers hold copies of the dataset and collate function; a plain int set in the main process after the
workers started (persistent_workers=True) would never reach them. The counter lives in a shared-memory
tensor instead, which forked and spawned workers map rather than copy.
"""

from __future__ import annotations

import numpy as np
import torch


class SharedEpoch:
    def __init__(self, epoch: int = 0):
        self._value = torch.full((1,), int(epoch), dtype=torch.int64).share_memory_()

    def set(self, epoch: int) -> None:
        self._value[0] = int(epoch)

    def get(self) -> int:
        return int(self._value[0])


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, index, ...), the same on every process and machine."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])
