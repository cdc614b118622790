"""Find the largest haystack that keeps a prompt within the token budget (RULER's binary search)."""

from __future__ import annotations

from collections.abc import Callable

from star_lightning.errors import ConfigurationError


def largest_fitting(fits: Callable[[int], bool], *, hint: int = 1, upper: int = 10_000_000) -> int:
    """The largest ``size`` in ``[1, upper]`` with ``fits(size)``, assuming ``fits`` is (nearly) monotone.

    Starts at ``hint`` (the previous sample's answer is a good one), gallops to bracket the answer, then bisects:
    a few tokenizations per sample instead of a full search.
    """
    hint = max(1, min(hint, upper))
    if fits(hint):
        low, step = hint, max(1, hint // 64)
        while low < upper and fits(min(low + step, upper)):
            low = min(low + step, upper)
            step *= 2
        high = min(low + step, upper + 1)  # first size known (or assumed) not to fit
    else:
        high, step = hint, max(1, hint // 64)
        low = 0
        while high > 1:
            candidate = max(1, high - step)
            if fits(candidate):
                low = candidate
                break
            high = candidate
            step *= 2
        if low == 0:
            raise ConfigurationError(
                "The target --length is too small: even the smallest haystack does not fit. Use a larger --length."
            )
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low
