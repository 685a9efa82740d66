"""Kits built in memory for unit tests: canary secrets, the derived fields filled in."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from trust_poller.kit import Kit

CANARY_HUB_KEY = "hub-canary-aGVsbG8td29ybGQtc2VjcmV0LWtleQ"
CANARY_INTERNAL_KEY = "internal-canary-Qm9vbGVhbi1zZWNyZXQtdmFsdWU"


def kit_in_memory(*, aes_key: bytes = bytes(32), **fields: Any) -> Kit:
    """A Kit as load_kit would build it, without a file; `fields` override any Kit field."""
    values: dict[str, Any] = {
        "path": Path("kit.env"),
        "hub_url": "https://hub.test/api",
        "api_key": CANARY_HUB_KEY,
        "api_key_header": "Authorization",
        "internal_service_key": CANARY_INTERNAL_KEY,
        **fields,
    }
    return Kit(aes_key=aes_key, aes_key_base64=base64.b64encode(aes_key).decode(), **values)
