"""Kubernetes resource quantities (``4Gi``, ``500M``, ``1.5Gi``, ``1e9``) parsed with bounded work.

The grammar is the one of ``k8s.io/apimachinery/pkg/api/resource``::

    quantity     ::= signedNumber suffix
    suffix       ::= binarySI | decimalExponent | decimalSI
    binarySI     ::= Ki | Mi | Gi | Ti | Pi | Ei
    decimalSI    ::= n | u | m | "" | k | M | G | T | P | E
    decimalExponent ::= (e | E) signedNumber

Pod authors write these values, so the text length and the exponent are bounded *before* any arithmetic:
``1e99999999`` is refused at once instead of building a number with a hundred million digits.
"""

from __future__ import annotations

import re
from fractions import Fraction

#: Longest quantity text accepted (Kubernetes' own quantities are far shorter).
MAX_TEXT = 64
#: Largest decimal exponent accepted, either sign (Kubernetes canonicalises to at most E = 10^18).
MAX_EXPONENT = 30

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": Fraction(1, 10**9), "u": Fraction(1, 10**6), "m": Fraction(1, 1000), "": Fraction(1),
            "k": Fraction(10**3), "M": Fraction(10**6), "G": Fraction(10**9), "T": Fraction(10**12),
            "P": Fraction(10**15), "E": Fraction(10**18)}
# ASCII digits only: str.isdigit() and \d also accept "²" and other Unicode digits.
_GRAMMAR = re.compile(r"([+-]?)([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE]([+-]?[0-9]+)|(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])?)",
                      re.ASCII)

EXAMPLES = "examples: 4Gi, 500M, 1.5Gi, 1e9, 1073741824"


def parse(text: object) -> Fraction:
    """The exact value of a quantity; raises ``ValueError`` saying what is wrong (never slow)."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a Kubernetes quantity ({EXAMPLES})")
    stripped = text.strip()
    if len(stripped) > MAX_TEXT:
        raise ValueError(f"a quantity of {len(stripped)} characters is too long (at most {MAX_TEXT}; {EXAMPLES})")
    match = _GRAMMAR.fullmatch(stripped)
    if not match:
        raise ValueError(f"{text!r} is not a Kubernetes quantity ({EXAMPLES})")
    sign, number, exponent, suffix = match.groups()
    value = Fraction(number)
    if exponent is not None:
        power = int(exponent)
        if abs(power) > MAX_EXPONENT:
            raise ValueError(f"{text!r}: the exponent {power} is out of range (at most ±{MAX_EXPONENT})")
        value *= Fraction(10) ** power
    elif suffix in _BINARY:
        value *= _BINARY[suffix]
    else:
        value *= _DECIMAL[suffix or ""]
    return -value if sign == "-" else value


def parse_bytes(text: object, maximum: int) -> int:
    """A byte count: rounded up to a whole byte (as Kubernetes does), positive and at most ``maximum``."""
    value = parse(text)
    size = -((-value.numerator) // value.denominator)  # ceiling
    if size <= 0:
        raise ValueError(f"{text!r} is not a positive size")
    if size > maximum:
        raise ValueError(f"{text!r} is {size} bytes, more than the largest allowed, {format_bytes(maximum)}")
    return size


def format_bytes(size: int) -> str:
    """``size`` in the largest binary unit that divides it (``1Ti``), else in bytes."""
    for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        unit = _BINARY[suffix]
        if size >= unit and size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)
