"""What torchrun tells each process through its environment, read here and nowhere else.

Without torch, so that the command line can ask it before importing torch: a config mistake is reported
without torch outside torchrun, and once per job under it (distributed.first_to_say).
"""

from __future__ import annotations

import os
from typing import Optional


def world_size() -> int:
    """The number of processes of the job (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def restart_count() -> int:
    """How many times torchrun has restarted the worker group (0 for the first attempt, and outside
    torchrun): a restarted group continues from its newest checkpoint."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def agent_store() -> Optional[tuple[str, int]]:
    """Host and port of the key-value store that torchrun's agent keeps for the job, which outlives the
    worker processes; None outside torchrun, or when the agent keeps none."""
    if world_size() <= 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
