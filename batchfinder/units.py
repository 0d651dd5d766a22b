"""Byte quantities: parse ``"64MiB"``-style strings and format byte counts for people."""

from __future__ import annotations

import re

__all__ = ["parse_bytes", "format_bytes", "binary_unit"]

_UNIT_FACTORS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}

_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | str, *, argument: str = "capacity") -> int:
    """Return a byte count from an ``int`` or a string such as ``"64MiB"``, ``"16GB"`` or ``"1.5 GiB"``.

    Decimal units (kB, MB, GB, TB) are powers of 1000, binary units (KiB, MiB, GiB, TiB) powers of 1024.
    ``argument`` names the parameter in the error raised for a value that does not parse or is not positive.
    """
    if isinstance(value, bool):
        raise TypeError(f"{argument} must be a byte count or a string such as '64MiB', not a bool")
    if isinstance(value, int):
        count = value
    elif isinstance(value, str):
        match = _QUANTITY.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNIT_FACTORS:
            raise ValueError(
                f"{argument}={value!r} does not parse as a memory size: use a whole number of bytes or a number "
                "with a unit, e.g. '64MiB', '16GB', '16GiB' (units: B, kB, KiB, MB, MiB, GB, GiB, TB, TiB)"
            )
        count = int(float(match.group(1)) * _UNIT_FACTORS[unit])
    else:
        raise TypeError(f"{argument} must be an int number of bytes or a string such as '64MiB', not {type(value).__name__}")
    if count <= 0:
        raise ValueError(f"{argument}={value!r} must be a positive amount of memory")
    return count


_BINARY_UNITS: tuple[tuple[str, int], ...] = (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))


def binary_unit(count: int | float) -> tuple[int, str]:
    """The largest binary unit that ``count`` bytes reach, as ``(bytes per unit, name)``; ``(1, "B")`` below 1 KiB."""
    for name, scale in _BINARY_UNITS:
        if abs(count) >= scale:
            return scale, name
    return 1, "B"


def format_bytes(count: int | float | None) -> str:
    """Format a byte count in binary units with two decimals, e.g. ``format_bytes(3136) == '3.06 KiB'``."""
    if count is None:
        return "-"
    scale, unit = binary_unit(count)
    if unit == "B":
        return f"{'-' if count < 0 else ''}{int(abs(count))} B"
    return f"{count / scale:.2f} {unit}"
