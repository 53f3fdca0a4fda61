"""Epoch-wise shuffled prompt stream whose position is a tiny, exact state for checkpoints.

The order of epoch ``e`` is a permutation drawn from ``(seed, e)`` alone, so the stream never needs to
store a permutation: ``(epoch, cursor)`` reproduces it, and a resumed run draws exactly the prompts the
uninterrupted run would have drawn. Requests may cross an epoch boundary (DAPO dynamic sampling asks for
more prompts mid-step); the epoch counter then says how far training has gone for
``trainer.total_epochs``.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from megacov.data.prompts import DataError, PromptRecord


class PromptLoader:
    """Draws prompts in a reproducible order; ``state_dict`` / ``load_state_dict`` for resume."""

    def __init__(self, records: Sequence[PromptRecord], *, shuffle: bool, seed: int) -> None:
        if not records:
            raise DataError("the prompt loader needs at least one prompt")
        self.records = list(records)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = 0
        self.cursor = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        n = len(self.records)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    @property
    def epochs_done(self) -> float:
        """Fractional epochs consumed (e.g. 1.25 after a quarter of the second pass)."""
        return self.epoch + self.cursor / len(self.records)

    def next(self, count: int) -> list[PromptRecord]:
        """The next ``count`` prompts, continuing into the next epoch when this one ends."""
        out: list[PromptRecord] = []
        while len(out) < count:
            if self.cursor == len(self._order):
                self.epoch += 1
                self.cursor = 0
                self._order = self._permutation(self.epoch)
            take = min(count - len(out), len(self._order) - self.cursor)
            out.extend(self.records[i] for i in self._order[self.cursor:self.cursor + take])
            self.cursor += take
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "num_records": len(self.records),
                "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["num_records"]) != len(self.records):
            raise DataError(f"the checkpoint's data position is for {state['num_records']} prompts, but the "
                            f"training files now hold {len(self.records)}: the data changed since it was saved")
        if int(state["seed"]) != self.seed or bool(state["shuffle"]) != self.shuffle:
            raise DataError("data.seed or data.shuffle differ from the checkpoint's; resume with the same values")
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self._order = self._permutation(self.epoch)
