"""Plain-text tables for the terminal (``rounds``, ``compare``, ``predict``): left-aligned columns under a rule."""

from __future__ import annotations


def columns(header: tuple[str, ...], lines: list[tuple[str, ...]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in lines])
