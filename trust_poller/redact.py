"""Keeps secrets out of every text that leaves the process: log lines and task results.

A secret is matched as itself and in the forms it can take on the way out: base64 (as a
header echo might show it) and URL-encoded. Credentials inside URLs are masked too.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from urllib.parse import quote, quote_plus

MASK = "[REDACTED]"
# What `outcome.bounded` appends where it cut a text; a secret cut there is masked too.
TRUNCATED = " [truncated]"
# Userinfo runs to the last "@" before the path, so "://:pass@" and "user:p@ss@" are covered; a
# quote ends it so JSON like {"u":"https://h","e":"a@b"} is left intact. The scheme length is
# capped so a long run like "a.a.a.…" cannot make the search quadratic.
_URL_CREDENTIALS = re.compile(r'(?i)\b([a-z][a-z0-9+.-]{0,31}://)[^\s/"<>\\]*@')


def _forms(secret: str) -> set[str]:
    raw = secret.encode()
    forms = {secret, quote(secret, safe=""), quote_plus(secret)}
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        encoded = encode(raw).decode()
        forms.add(encoded)
        forms.add(encoded.rstrip("="))
    return {form for form in forms if len(form) >= 6}


class Redactor:
    """Replaces every known secret (and its encoded forms) with a mask."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._pattern: re.Pattern[str] | None = None
        self._forms: set[str] = set()
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        for secret in secrets:
            if secret:
                self._forms |= _forms(secret)
        if self._forms:
            longest_first = sorted(self._forms, key=len, reverse=True)
            self._pattern = re.compile("|".join(map(re.escape, longest_first)))

    def scrub(self, text: str) -> str:
        if self._pattern is not None:
            text = self._mask_cut_secrets(self._mask_secrets(text, self._pattern))
        return _URL_CREDENTIALS.sub(rf"\1{MASK}@", text)

    def _mask_cut_secrets(self, text: str) -> str:
        """A text cut (before it was scrubbed) in the middle of a secret keeps only the
        secret's start, just before the cut mark: mask that start too."""
        if TRUNCATED not in text:
            return text
        pieces: list[str] = []
        kept_from = 0
        for mark in re.finditer(re.escape(TRUNCATED), text):
            cut_at = mark.start()
            longest = 0
            for form in self._forms:
                for length in range(min(len(form) - 1, cut_at - kept_from), 3, -1):
                    if text[cut_at - length : cut_at] == form[:length]:
                        longest = max(longest, length)
                        break
            pieces.append(text[kept_from : cut_at - longest])
            if longest:
                pieces.append(MASK)
            kept_from = cut_at
        pieces.append(text[kept_from:])
        return "".join(pieces)

    @staticmethod
    def _mask_secrets(text: str, pattern: re.Pattern[str]) -> str:
        # Occurrences can overlap ("…aaaabbbb" + "bbbbcccc…"); masking the union of every
        # occurrence, not just the leftmost ones, leaves no fragment of either secret.
        spans: list[tuple[int, int]] = []
        position = 0
        while (match := pattern.search(text, position)) is not None:
            start, end = match.span()
            if spans and start < spans[-1][1]:
                spans[-1] = (spans[-1][0], max(spans[-1][1], end))
            else:
                spans.append((start, end))
            position = start + 1
        if not spans:
            return text
        pieces: list[str] = []
        kept_from = 0
        for start, end in spans:
            pieces += (text[kept_from:start], MASK)
            kept_from = end
        pieces.append(text[kept_from:])
        return "".join(pieces)
