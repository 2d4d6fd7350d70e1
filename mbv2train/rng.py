"""Seeds derived from (seed, epoch, index, ...) rather than from whatever state a global RNG is in.

Every random draw of a run (initialization, shuffling, per-sample augmentation, dropout, MixUp/CutMix)
is seeded from its position in the run, so a run resumed from a checkpoint draws exactly what the
uninterrupted run would have drawn, whatever number of workers loads the data.
"""

from __future__ import annotations

import hashlib
import struct

# Tags keep the streams apart: the shuffle of epoch 3 never equals the augmentation of sample 3.
INIT, SHUFFLE, SAMPLE, STEP = 1, 2, 3, 4


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (non-negative ints), well mixed by a hash."""
    digest = hashlib.blake2b(struct.pack(f"<{len(parts)}q", *parts), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
