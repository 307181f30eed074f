"""Seed lists as the train and sweep CLIs take them: a range `0-4`, a list `0,3,7`, or both `0-2,7`."""
from __future__ import annotations

from typing import Iterable

HOW = "write a range as low-high (0-4 is seeds 0,1,2,3,4) or a comma-separated list (0,2,5), or both (0-2,7)"


class SeedListError(ValueError):
    """A seed list that cannot be trained; the message says what is wrong and how to write it."""


def parse_seeds(text: str, flag: str = "--seeds") -> tuple[int, ...]:
    """'0-4' -> (0, 1, 2, 3, 4); '0,2,5'; '0-2,7'. Empty parts, negative seeds, ranges that go down and
    repeated seeds are refused with a SeedListError naming the part."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if part.startswith("-") and part[1:].isdigit():
            raise SeedListError(f"{flag} {text!r}: {part} is negative; seeds are non-negative integers")
        lo, sep, hi = part.partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise SeedListError(f"{flag} {text!r}: {part!r} is not a seed or a range of seeds; {HOW}") from None
        if a < 0 or b < 0:
            raise SeedListError(f"{flag} {text!r}: seeds are non-negative integers; {HOW}")
        if b < a:
            raise SeedListError(f"{flag} {text!r}: the range {part!r} goes down; {HOW}")
        seeds.extend(range(a, b + 1))
    return check_seeds(seeds, f"{flag} {text!r}")


def check_seeds(seeds: Iterable[int], what: str = "seeds") -> tuple[int, ...]:
    """A seed list as FastDTQL trains it (update.check_seeds: non-empty, non-negative, none twice),
    its complaint as a SeedListError that says whose list it is."""
    from .update import check_seeds as rule  # torch: imported only when a list is checked

    try:
        return tuple(rule(seeds))
    except ValueError as e:
        raise SeedListError(f"{what}: {e}") from None


def format_seeds(seeds: Iterable[int], sep: str = ",") -> str:
    """The inverse of parse_seeds, runs of consecutive seeds as ranges: (0, 1, 2, 7) -> '0-2,7'."""
    seeds = list(seeds)
    parts, i = [], 0
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(str(seeds[i]) if j == i else f"{seeds[i]}-{seeds[j]}")
        i = j + 1
    return sep.join(parts)


def folder_label(seeds: Iterable[int]) -> str:
    """A seed group's part of a run folder name: 'seeds0-4', 'seeds0_3_7', 'seeds0-2_7', 'seeds3'.
    ('seeds', not a single run's 's<k>': a group of one is another checkpoint format than --seed k.)"""
    return "seeds" + format_seeds(seeds, sep="_")
