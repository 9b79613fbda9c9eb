"""A PEM certificate's validity period, read from its DER (no crypto library needed).

X.509 (RFC 5280 4.1): Certificate ::= SEQUENCE { tbsCertificate, ... }; TBSCertificate ::=
SEQUENCE { [0] version OPTIONAL, serialNumber, signature, issuer, validity, ... }; Validity
::= SEQUENCE { notBefore Time, notAfter Time }, each a UTCTime or a GeneralizedTime.
"""

from __future__ import annotations

import re
import ssl
from datetime import UTC, datetime

SEQUENCE, CONTEXT_0, UTC_TIME, GENERALIZED_TIME = 0x30, 0xA0, 0x17, 0x18
PEM_CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def _element(der: bytes, at: int) -> tuple[int, int, int]:
    """(tag, start of contents, end of contents) of the DER element at `at`."""
    tag, length = der[at], der[at + 1]
    start = at + 2
    if length & 0x80:  # long form: the next (length & 0x7F) bytes hold the length
        count = length & 0x7F
        length = int.from_bytes(der[start : start + count], "big")
        start += count
    if start + length > len(der):
        raise ValueError("a DER element runs past the certificate's end")
    return tag, start, start + length


def _time(tag: int, text: str) -> datetime:
    """A UTCTime (YYMMDDHHMMSSZ: 1950-2049) or GeneralizedTime (YYYYMMDDHHMMSSZ)."""
    if tag == UTC_TIME:
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    return datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=UTC)


def validities(pem: str) -> list[tuple[datetime, datetime]]:
    """(notBefore, notAfter) of each certificate in `pem`, in order (the server's own
    first, then its chain); ValueError when there is none or one is not DER X.509."""
    blocks = PEM_CERTIFICATE.findall(pem)
    if not blocks:
        raise ValueError("no PEM certificate in it")
    return [_validity(block) for block in blocks]


def _validity(block: str) -> tuple[datetime, datetime]:
    try:
        der = ssl.PEM_cert_to_DER_cert(block)
        _, start, _ = _element(der, 0)  # Certificate
        tag, at, _ = _element(der, start)  # TBSCertificate
        if tag != SEQUENCE:
            raise ValueError("not an X.509 certificate")
        before = 0  # serialNumber, signature, issuer (and an optional [0] version) come first
        while before < 3:
            tag, _, end = _element(der, at)
            before += tag != CONTEXT_0
            at = end
        tag, at, _ = _element(der, at)  # Validity
        times = []
        for _ in range(2):
            tag, start, end = _element(der, at)
            if tag not in (UTC_TIME, GENERALIZED_TIME):
                raise ValueError("not an X.509 validity period")
            times.append(_time(tag, der[start:end].decode("ascii")))
            at = end
    except (IndexError, UnicodeDecodeError) as exc:
        raise ValueError(f"not an X.509 certificate ({exc})") from None
    return times[0], times[1]
