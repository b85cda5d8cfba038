"""What RL checkpoints hold: only the state that trains (the backbone is reloaded from its folder), the
hash of the weights it was trained against, and the random-number generators, so that a resumed run
samples what the uninterrupted run would have sampled (Lightning saves no RNG state).

Under DDP every rank samples its own rollouts: the ranks' generators are split at setup, and a
checkpoint holds every rank's generators (rank 0 writes it), so each rank resumes its own stream."""

from __future__ import annotations

import hashlib
import logging
import random

import numpy as np
import torch
from lightning.fabric.utilities.seed import seed_everything

log = logging.getLogger(__name__)


def rng_states() -> dict:
    """Plain tensors, numbers and tuples only, so Lightning's `weights_only` loading accepts them."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached))
    states = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class TrainableStateCheckpoints:
    """LightningModule hooks for RL checkpoints. The module defines `is_backbone_key(key)` (weights
    left out), `protected_sha256` (hash of the weights it trains against) and `arm_name`."""

    _rng_to_restore: dict | None = None

    def setup(self, stage: str) -> None:
        # Every rank was seeded alike; with one stream the ranks would draw the same noise for their
        # different questions. Rank r continues from a seed drawn from the common stream and r.
        if self.trainer.world_size > 1:
            drawn = int(torch.randint(2**62, ()))
            rank_seed = int.from_bytes(
                hashlib.sha256(f"{drawn}:{self.trainer.global_rank}".encode()).digest()[:4], "little"
            )
            seed_everything(rank_seed, workers=True, verbose=False)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if self.is_backbone_key(k)]:
            del state[key]
        checkpoint["protected_sha256"] = self.protected_sha256
        states = [rng_states()]
        if self.trainer.world_size > 1:  # every rank dumps the checkpoint; rank 0 writes it
            states = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(states, rng_states())
        checkpoint["rng_states"] = states  # one entry per rank

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Applied at the first batch: creating the data iterator after loading draws from torch's RNG,
        # which the uninterrupted run did before the step the checkpoint was taken at.
        states, rank = checkpoint.get("rng_states") or [], self.trainer.global_rank
        if len(states) != self.trainer.world_size:
            log.warning(
                "the checkpoint holds random states for %d processes and this run has %d: sampling after "
                "the resume will differ from the uninterrupted run's",
                len(states),
                self.trainer.world_size,
            )
        self._rng_to_restore = states[rank] if rank < len(states) else None
        saved = checkpoint.get("protected_sha256")
        if saved and self.protected_sha256 and saved != self.protected_sha256:
            raise RuntimeError(
                f"this {self.arm_name} checkpoint was trained against different backbone weights (their hash "
                "differs): resume with the same backbone"
            )
        expected = {k for k in self.state_dict() if not self.is_backbone_key(k)}
        missing = sorted(expected - set(checkpoint["state_dict"]))
        if missing:
            raise RuntimeError(
                f"the checkpoint lacks {len(missing)} {self.arm_name} weights, e.g. {missing[:3]}: "
                f"not a {self.arm_name} checkpoint of this config"
            )
