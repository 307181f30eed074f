"""Seed lists as the train and sweep CLIs take them: a range `0-4`, a list `0,3,7`, or both `0-2,7`."""
from __future__ import annotations

from collections import Counter
from typing import Iterable

HOW = "write a range as low-high (0-4 is seeds 0,1,2,3,4) or a comma-separated list (0,2,5), or both (0-2,7)"


# Seeds are 32-bit: a larger one would be folded onto a smaller one's weights (4294967296 trains seed 0's).
MAX_SEED = 2**32 - 1
# More agents than any machine holds; a longer range is refused before its list is built.
MAX_SEEDS = 2**20


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
        if b > MAX_SEED:
            raise SeedListError(f"{flag} {text!r}: seed {b} is past the largest, {MAX_SEED}; give seeds 0-{MAX_SEED}")
        if len(seeds) + b - a + 1 > MAX_SEEDS:
            raise SeedListError(f"{flag} {text!r}: more than {MAX_SEEDS} seeds; split the list over several runs")
        seeds.extend(range(a, b + 1))
    return check_seeds(seeds, f"{flag} {text!r}")


def check_seeds(seeds: Iterable[int], what: str = "seeds") -> tuple[int, ...]:
    """A seed list as FastDTQL trains it: non-empty, non-negative integers, none twice. Otherwise a
    SeedListError that says whose list it is (`what`) and what is wrong."""
    seeds = list(seeds)
    if not seeds:
        raise SeedListError(f"{what}: the seed list is empty; give at least one seed")
    bad = [s for s in seeds if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s <= MAX_SEED]
    if bad:
        raise SeedListError(f"{what}: seeds must be non-negative integers up to {MAX_SEED}; got {bad[:5]}")
    repeated = sorted(s for s, n in Counter(seeds).items() if n > 1)
    if repeated:
        shown = seeds if len(seeds) <= 20 else f"[{', '.join(map(str, seeds[:20]))}, ...] ({len(seeds)} seeds)"
        raise SeedListError(f"{what}: seed {repeated[0]} is listed more than once in {shown}; "
                            "each seed trains one agent")
    return tuple(seeds)


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
