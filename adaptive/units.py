"""Human-readable memory sizes: ``parse_size("512MiB")`` and ``format_size(n)``.

Budgets arrive from flags, config files and environment variables as text; every
entry point converts them here so that "1GB" means the same thing everywhere.
"""

from __future__ import annotations

import re
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation

__all__ = ["UNITS", "format_size", "parse_size"]

#: Accepted units (case-insensitive) and their size in bytes. SI prefixes are powers of
#: 1000, IEC prefixes (KiB, MiB, ...) powers of 1024, as in the standards.
UNITS: dict[str, int] = {
    "B": 1,
    "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
    "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4,
}
_BY_LOWER = {name.lower(): factor for name, factor in UNITS.items()}
_SIZE_RE = re.compile(r"^\s*(?P<num>(?:\d+(?:\.\d*)?|\.\d+))\s*(?P<unit>[A-Za-z]*)\s*$")
_ACCEPTED = ", ".join(UNITS)


def parse_size(text: str | int) -> int:
    """Return the number of bytes that ``text`` names, e.g. ``"1.5GiB"`` -> 1610612736.

    Accepts a non-negative integer or decimal number, an optional space and an optional
    unit (B, KB, MB, GB, TB in powers of 1000; KiB, MiB, GiB, TiB in powers of 1024;
    case-insensitive). A plain number means bytes. Fractions of a byte are rounded to
    the nearest byte. An ``int`` is returned unchanged (if non-negative) so callers can
    pass either form.
    """
    if isinstance(text, bool):
        raise TypeError(f"size must be a string like '512MiB' or an int, got {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must be >= 0 bytes, got {text}")
        return text
    if not isinstance(text, str):
        raise TypeError(f"size must be a string like '512MiB' or an int, got {text!r}")
    match = _SIZE_RE.match(text)
    if match is None:
        raise ValueError(f"cannot parse size {text!r}: expected a non-negative number and an "
                         f"optional unit, e.g. '512MiB' or '1.5 GB'; units: {_ACCEPTED}")
    unit = match["unit"]
    factor = _BY_LOWER.get(unit.lower()) if unit else 1
    if factor is None:
        raise ValueError(f"unknown size unit {unit!r} in {text!r}; accepted units "
                         f"(case-insensitive): {_ACCEPTED}")
    try:
        number = Decimal(match["num"])
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only decimals
        raise ValueError(f"cannot parse the number in size {text!r}") from exc
    return int((number * factor).to_integral_value(rounding=ROUND_HALF_EVEN))


def format_size(n: int) -> str:
    """Format a byte count with binary units for logs and tables: ``512.0 MiB``.

    Counts below 1 KiB are shown as whole bytes (``"512 B"``); larger ones with one
    decimal in the largest IEC unit that keeps the number at or above 1.
    """
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        raise TypeError(f"format_size expects a number of bytes, got {n!r}")
    sign = "-" if n < 0 else ""
    value = abs(n)
    if value < 1024:
        return f"{sign}{int(value)} B"
    for unit in ("KiB", "MiB", "GiB"):
        # Compare the rounded figure so 1 MiB - 1 B reads "1.0 MiB", not "1024.0 KiB".
        if round(value / UNITS[unit], 1) < 1024:
            return f"{sign}{value / UNITS[unit]:.1f} {unit}"
    return f"{sign}{value / UNITS['TiB']:.1f} TiB"
