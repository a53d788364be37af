"""Seeds: the one default of every command's --seed, and each sample's seed (docs/design.md, Determinism).

Every random choice derives from --seed and a prompt's index, never from batch position, batch size or
process rank; `sample_seed` is the seed an in-process engine samples one completion with.
"""

from __future__ import annotations

import hashlib

DEFAULT_SEED = 42
"""--seed of every command that has one (and the pipeline's when its config names none)."""


def sample_seed(seed: int, index: int, slot: str, attempt: int) -> int:
    """The sampling seed of one completion: BLAKE2b of `seed:index:slot:attempt` (simulate: slot and attempt;
    generate: "generate", 0; PPO: "ppo{step}" and its position)."""
    digest = hashlib.blake2b(f"{seed}:{index}:{slot}:{attempt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
