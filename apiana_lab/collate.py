"""Longest first, then back in input order: the one collator every batching path uses."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Collator:
    """An order over items, longest first (ties keep input order), and its inverse.

    Batches cut from `ordered` hold prompts of similar length, so little padding is wasted and
    the longest (slowest) work starts first. `restore` puts results, given in that order, back
    in input order.
    """

    def __init__(self, lengths: Sequence[int]):
        self.order: list[int] = sorted(range(len(lengths)), key=lambda i: -lengths[i])

    @classmethod
    def by(cls, items: Sequence[T], length: Callable[[T], int]) -> Collator:
        return cls([length(item) for item in items])

    def ordered(self, items: Sequence[T]) -> list[T]:
        """The items, longest first."""
        return [items[i] for i in self.order]

    def restore(self, results: Sequence[R]) -> list[R]:
        """Results given longest first, back in input order."""
        if len(results) != len(self.order):
            raise ValueError(f"{len(results)} results for {len(self.order)} items")
        out: list = [None] * len(self.order)
        for position, i in enumerate(self.order):
            out[i] = results[position]
        return out
