"""The validation split: a seeded share of the *training* images, held out of training.

Model selection, early stopping and calibration look at these images only; the dataset's test
split is kept for the final table (``lipdet eval`` / ``lipdet experiment``).

The rule (:meth:`ValSplit.held_out`): every training image gets the key
``sha256(f"{seed}:{name}")`` of its file name; the ``count`` images with the smallest keys are the
validation split, the others train. It depends on the seed and the image names alone -- not on the
order of the records, the process (no ``hash()`` randomisation), the NumPy version or the Ray
worker -- so every worker of a run, a resumed run and a later audit carve out the same images.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lipdet.errors import LipdetError

__all__ = ["DEFAULT_VAL_FRACTION", "ValSplit"]

DEFAULT_VAL_FRACTION = 0.1
"""Share of the training images held out by default: 400 of the synthetic set's 4000, 3340 of
SVHN's 33,402 train images."""

RULE = "the count train images with the smallest sha256('{seed}:{name}')"


@dataclass(frozen=True)
class ValSplit:
    """Which training images are held out for validation.

    Attributes:
        seed: seeds the choice (``--val-seed``).
        fraction: share of the train split held out, in ``(0, 1)`` (``--val-fraction``); the count is
            ``max(1, round(fraction * n))`` of ``n`` usable train images.
        count: when > 0, hold out exactly this many images instead (``--val-count``).
    """

    seed: int = 0
    fraction: float = DEFAULT_VAL_FRACTION
    count: int = 0

    def check(self) -> "ValSplit":
        """Refuse values that cannot describe a split (one-line :class:`LipdetError`); returns self."""
        if not (isinstance(self.fraction, (int, float)) and 0.0 < self.fraction < 1.0):
            raise LipdetError(f"val_fraction must be > 0 and < 1, got {self.fraction}")
        if self.count < 0:
            raise LipdetError(f"val_count must be >= 1 (or 0 to use val_fraction), got {self.count}")
        return self

    def size(self, n_train: int) -> int:
        """Images held out of ``n_train`` training images; refuses a split that leaves none to train on."""
        self.check()
        k = self.count if self.count > 0 else max(1, math.floor(self.fraction * n_train + 0.5))
        if k >= n_train:
            what = f"val_count={self.count}" if self.count > 0 else f"val_fraction={self.fraction:g}"
            raise LipdetError(f"{what} holds out {k} images, but the train split has only {n_train}: "
                              "nothing would be left to train on")
        return k

    def held_out(self, names: Sequence[str]) -> list[int]:
        """Positions in ``names`` (the train split's image names, one per usable image) of the
        validation images, ascending. See the module notes for the rule."""
        k = self.size(len(names))
        keys = sorted((self._key(name), i) for i, name in enumerate(names))
        return sorted(i for _, i in keys[:k])

    def parts(self, names: Sequence[str]) -> tuple[list[int], list[int]]:
        """``(train positions, validation positions)`` in ``names``: disjoint, together all of them."""
        val = self.held_out(names)
        chosen = set(val)
        return [i for i in range(len(names)) if i not in chosen], val

    def record(self, names: Sequence[str]) -> dict[str, Any]:
        """What a checkpoint and a model card record of the split (``data["val"]``).

        ``{"from": "train", "seed", "fraction", "count", "of", "rule", "names_sha256"}``: ``count``
        images held out of ``of``; ``names_sha256`` is the sha256 of the held-out names, sorted and
        newline-joined, so an audit can check the exact images.
        """
        held = sorted(names[i] for i in self.held_out(names))
        return {
            "from": "train",
            "seed": int(self.seed),
            "fraction": float(self.fraction),
            "count": len(held),
            "of": len(names),
            "rule": RULE,
            "names_sha256": hashlib.sha256("\n".join(held).encode()).hexdigest(),
        }

    def describe(self, held: int, used: int | None = None) -> str:
        """``"validation (400 images held out of train, seed 0)"`` (``used`` < ``held``: ``"first 16
        of 400 ..."``): what the start line, metrics.jsonl and curves.png say."""
        first = f"first {used} of " if used is not None and used < held else ""
        return f"validation ({first}{held} images held out of train, seed {self.seed})"

    def to_dict(self) -> dict[str, Any]:
        """The options, as a run description (``train.json``) keeps them."""
        return {"seed": int(self.seed), "fraction": float(self.fraction), "count": int(self.count)}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "ValSplit":
        """From :meth:`to_dict` (or a :meth:`record`: its ``count`` is the held-out count); None: the default."""
        d = d or {}
        return cls(seed=int(d.get("seed", 0)), fraction=float(d.get("fraction", DEFAULT_VAL_FRACTION)),
                   count=int(d.get("count", 0)))

    def _key(self, name: str) -> bytes:
        return hashlib.sha256(f"{self.seed}:{name}".encode()).digest()
