"""Find the largest haystack that keeps a prompt within the token budget (RULER's binary search, faster)."""

from __future__ import annotations

from collections.abc import Callable

from star_lightning.errors import ConfigurationError


def largest_fitting(
    measure: Callable[[int], int], budget: int, *, hint: int = 1, upper: int = 10_000_000, max_steps: int = 64
) -> int:
    """The largest ``size`` in ``[1, upper]`` with ``measure(size) <= budget``.

    ``measure`` (the prompt's token count) grows about linearly with the haystack size, so secant steps land next
    to the answer in two or three tokenizations of the whole prompt, where a plain bisection needs ~20; the
    bracket [fitting size, non-fitting size] is kept, and bisection takes over whenever a step would leave it.
    Starting from ``hint`` (the previous sample's answer) usually costs three tokenizations.
    """
    low, high = 0, upper + 1  # low: largest size seen to fit (0: none); high: smallest seen not to fit
    size = max(1, min(hint, upper))
    previous: tuple[int, int] | None = None
    for _ in range(max_steps):
        count = measure(size)
        if count <= budget:
            low = max(low, size)
        else:
            high = min(high, size)
        if high - low <= 1:
            break
        guess = _next_guess(size, count, previous, budget)
        if count <= budget and guess <= size:
            guess = size + 1  # fits: the next size up decides whether this is the answer
        elif count > budget and guess >= size:
            guess = size - 1
        if not low < guess < high:
            guess = (low + high) // 2 if high <= upper else min(upper, 2 * low)
        previous, size = (size, count), max(guess, 1)
    if low == 0:
        raise ConfigurationError("The target --length is too small: even the smallest haystack does not fit.")
    return low


def _next_guess(size: int, count: int, previous: tuple[int, int] | None, budget: int) -> int:
    """Secant through the last two measurements, or proportional scaling from one."""
    if previous is not None and previous[0] != size:
        slope = (count - previous[1]) / (size - previous[0])
        if slope > 0:
            return int(size + (budget - count) / slope)
    return int(size * budget / max(count, 1))
