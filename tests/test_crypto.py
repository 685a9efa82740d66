"""Payload envelopes: the hub's exact format, and every way a payload is refused."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from trust_poller import crypto
from trust_poller.errors import PayloadRejected

KAT_KEY = bytes(range(32))
KAT_NONCE = bytes(range(12))
KAT_ENVELOPE = (
    "eyJ2IjogMSwgImtpZCI6ICJzaGFyZWQiLCAiaXYiOiAiQUFFQ0F3UUZCZ2NJQ1FvTCIsICJjdCI6ICJMR3k1Ykt2"
    "SW8zWCtOdkw1MFo3MFNwSTgzd1NLbGlyaUxJa25PQT09In0="
)

KEY = bytes(range(200, 232))
OTHER_KEY = bytes(range(32, 64))
KEY_TEXTS = (
    base64.b64encode(KEY).decode(),
    KEY.hex(),
    base64.b64encode(OTHER_KEY).decode(),
    OTHER_KEY.hex(),
)


def envelope_of(fields: Any) -> str:
    """Encode any JSON value the way the hub encodes an envelope."""
    return base64.b64encode(json.dumps(fields).encode()).decode()


def valid_fields(plaintext: bytes = b'{"query_id": "q1"}', context: str = "ctx") -> dict[str, Any]:
    fields: dict[str, Any] = json.loads(
        base64.b64decode(crypto.seal_envelope(KEY, plaintext, context))
    )
    return fields


def rejection(envelope: object, context: str = "ctx", key: bytes = KEY) -> str:
    """Open and return the rejection message, checking it carries no key material."""
    with pytest.raises(PayloadRejected) as caught:
        crypto.open_envelope(key, envelope, context)
    message = str(caught.value)
    assert message
    for text in KEY_TEXTS:
        assert text not in message
    return message


# --- the hub's format ------------------------------------------------------------------------


def test_seal_envelope_reproduces_the_known_answer_vector() -> None:
    assert crypto.seal_envelope(KAT_KEY, b"known-answer", "kat", KAT_NONCE) == KAT_ENVELOPE


def test_open_envelope_opens_the_known_answer_vector() -> None:
    assert crypto.open_envelope(KAT_KEY, KAT_ENVELOPE, "kat") == b"known-answer"


def test_known_answer_vector_uses_associated_data_flip_v1_shared_context() -> None:
    fields = json.loads(base64.b64decode(KAT_ENVELOPE))
    sealed = base64.b64decode(fields["ct"])
    plaintext = AESGCM(KAT_KEY).decrypt(KAT_NONCE, sealed, b"FLIP|v1|shared|kat")
    assert plaintext == b"known-answer"


def test_envelope_json_has_hub_key_order_and_separators() -> None:
    text = base64.b64decode(crypto.seal_envelope(KAT_KEY, b"known-answer", "kat", KAT_NONCE))
    assert text == (
        b'{"v": 1, "kid": "shared", "iv": "AAECAwQFBgcICQoL", '
        b'"ct": "LGy5bKvIo3X+NvL50Z70SpI83wSKliriLIknOA=="}'
    )


def test_sealed_envelope_is_padded_standard_base64_with_a_12_byte_nonce() -> None:
    envelope = crypto.seal_envelope(KEY, b"x" * 7, "ctx")
    assert len(envelope) % 4 == 0
    fields = json.loads(base64.b64decode(envelope, validate=True))
    assert list(fields) == ["v", "kid", "iv", "ct"]
    assert len(base64.b64decode(fields["iv"], validate=True)) == 12
    assert len(base64.b64decode(fields["ct"], validate=True)) == 7 + 16


def test_seal_envelope_draws_a_fresh_nonce_each_time() -> None:
    nonces = {valid_fields(b"same")["iv"] for _ in range(8)}
    assert len(nonces) == 8


def test_task_context_and_associated_data_follow_the_protocol() -> None:
    assert crypto.task_context("cohort_query") == "task:cohort_query"
    assert crypto.associated_data("shared", "task:cohort_query") == (
        b"FLIP|v1|shared|task:cohort_query"
    )


def test_key_fingerprint_of_32_bytes_0x01_matches_the_protocol_example() -> None:
    assert crypto.key_fingerprint(b"\x01" * 32) == "72cd6e8422c4"


def test_key_fingerprint_is_first_12_hex_of_sha256_of_raw_key() -> None:
    assert crypto.key_fingerprint(KEY) == hashlib.sha256(KEY).hexdigest()[:12]
    assert crypto.key_fingerprint(KEY) != crypto.key_fingerprint(OTHER_KEY)


def test_cohort_admin_key_is_sha256_hex_of_the_base64_text_not_the_raw_key() -> None:
    text = base64.b64encode(KEY).decode()
    admin_key = crypto.cohort_admin_key(text)
    assert admin_key == hashlib.sha256(text.encode("ascii")).hexdigest()
    assert admin_key != hashlib.sha256(KEY).hexdigest()
    assert len(admin_key) == 64
    assert admin_key == admin_key.lower()


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("plaintext", [b"", b"{}", "ünïcödé".encode(), bytes(range(256)) * 40])
def test_sealed_payload_opens_to_the_same_bytes(plaintext: bytes) -> None:
    envelope = crypto.seal_envelope(KEY, plaintext, "task:persist_cohort")
    assert crypto.open_envelope(KEY, envelope, "task:persist_cohort") == plaintext


def test_open_task_payload_returns_the_json_object_of_its_task_type() -> None:
    payload = {"query_id": "q1", "query": "SELECT 1", "trust_id": "t1"}
    envelope = crypto.seal_envelope(KEY, json.dumps(payload).encode(), "task:cohort_query")
    assert crypto.open_task_payload(KEY, "cohort_query", envelope) == payload


# --- rejections ------------------------------------------------------------------------------


@pytest.mark.parametrize("envelope", [None, 42, b"ZXlK", ["x"], {"v": 1}])
def test_envelope_that_is_not_a_string_is_rejected(envelope: object) -> None:
    assert "not a string" in rejection(envelope)


@pytest.mark.parametrize(
    "envelope",
    [
        "not base64 at all!",
        "eyJ2IjogMX0",  # padding dropped
        "eyJ2Ijo-MX0=",  # url-safe alphabet
        "ÿÿÿÿ",
        "",
    ],
)
def test_envelope_that_is_not_base64_is_rejected(envelope: str) -> None:
    message = rejection(envelope)
    assert "base64" in message or "JSON" in message


def test_base64_of_non_json_is_rejected() -> None:
    assert "not JSON" in rejection(base64.b64encode(b"hello, hub").decode())


def test_base64_of_non_utf8_bytes_is_rejected() -> None:
    assert "not JSON" in rejection(base64.b64encode(b"\xff\xfe{}").decode())


@pytest.mark.parametrize("value", [[1, "shared"], "text", 1, None, True])
def test_json_that_is_not_an_object_is_rejected(value: Any) -> None:
    assert "not a JSON object" in rejection(envelope_of(value))


@pytest.mark.parametrize(
    "bad_version",
    [
        pytest.param(None, id="missing"),
        pytest.param(True, id="bool-true"),
        pytest.param(False, id="bool-false"),
        pytest.param("1", id="string"),
        pytest.param(1.0, id="float"),
        pytest.param([1], id="list"),
    ],
)
def test_version_missing_or_not_an_integer_is_rejected(bad_version: Any) -> None:
    fields = valid_fields()
    if bad_version is None:
        del fields["v"]
    else:
        fields["v"] = bad_version
    assert "'v' missing or not an integer" in rejection(envelope_of(fields))


@pytest.mark.parametrize("name", ["kid", "iv", "ct"])
@pytest.mark.parametrize("bad_value", [None, 1, True, ["x"], {"x": 1}], ids=repr)
def test_kid_iv_or_ct_missing_or_not_a_string_is_rejected(name: str, bad_value: Any) -> None:
    fields = valid_fields()
    if bad_value is None:
        del fields[name]
    else:
        fields[name] = bad_value
    assert f"'{name}' missing or not a string" in rejection(envelope_of(fields))


@pytest.mark.parametrize("version", [0, 2, -1, 10**6])
def test_version_other_than_1_is_rejected(version: int) -> None:
    fields = {**valid_fields(), "v": version}
    assert f"unsupported envelope version {version}" in rejection(envelope_of(fields))


@pytest.mark.parametrize("kid", ["rotated-2025", "", "SHARED"])
def test_unknown_kid_is_rejected(kid: str) -> None:
    fields = {**valid_fields(), "kid": kid}
    assert "unknown key id" in rejection(envelope_of(fields))


@pytest.mark.parametrize("length", [0, 8, 11, 13, 16])
def test_nonce_that_is_not_12_bytes_is_rejected(length: int) -> None:
    fields = {**valid_fields(), "iv": base64.b64encode(bytes(length)).decode()}
    assert f"nonce is {length} bytes, expected 12" in rejection(envelope_of(fields))


@pytest.mark.parametrize("field", ["iv", "ct"])
def test_iv_or_ct_that_is_not_base64_is_rejected(field: str) -> None:
    fields = {**valid_fields(), field: "%%% not base64 %%%"}
    assert f"{field} is not base64" in rejection(envelope_of(fields))


@pytest.mark.parametrize("length", [0, 1, 15])
def test_ciphertext_shorter_than_the_tag_is_rejected(length: int) -> None:
    fields = {**valid_fields(), "ct": base64.b64encode(bytes(length)).decode()}
    assert "shorter than its tag" in rejection(envelope_of(fields))


def test_ciphertext_of_exactly_a_tag_opens_to_empty_plaintext() -> None:
    envelope = crypto.seal_envelope(KEY, b"", "ctx")
    assert len(base64.b64decode(json.loads(base64.b64decode(envelope))["ct"])) == 16
    assert crypto.open_envelope(KEY, envelope, "ctx") == b""


@pytest.mark.parametrize("position", [0, 5, -1], ids=["first-byte", "middle", "tag"])
def test_tampered_ciphertext_fails_authentication(position: int) -> None:
    fields = valid_fields(b'{"query": "SELECT 1"}')
    sealed = bytearray(base64.b64decode(fields["ct"]))
    sealed[position] ^= 0x01
    fields["ct"] = base64.b64encode(bytes(sealed)).decode()
    assert "failed authentication" in rejection(envelope_of(fields))


def test_tampered_nonce_fails_authentication() -> None:
    fields = valid_fields()
    nonce = bytearray(base64.b64decode(fields["iv"]))
    nonce[0] ^= 0x80
    fields["iv"] = base64.b64encode(bytes(nonce)).decode()
    assert "failed authentication" in rejection(envelope_of(fields))


def test_payload_sealed_with_another_key_fails_authentication() -> None:
    envelope = crypto.seal_envelope(OTHER_KEY, b"{}", "ctx")
    message = rejection(envelope)
    assert "failed authentication" in message
    assert "AES key differs" in message


def test_payload_sealed_for_cohort_query_is_rejected_as_delete_imaging() -> None:
    envelope = crypto.seal_envelope(KEY, b'{"imaging_project_id": "p"}', "task:cohort_query")
    with pytest.raises(PayloadRejected, match="failed authentication"):
        crypto.open_task_payload(KEY, "delete_imaging", envelope)
    assert crypto.open_task_payload(KEY, "cohort_query", envelope) == {"imaging_project_id": "p"}


def test_open_task_payload_rejects_plaintext_that_is_not_json() -> None:
    envelope = crypto.seal_envelope(KEY, b"SELECT * FROM person", "task:cohort_query")
    with pytest.raises(PayloadRejected, match="plaintext is not JSON"):
        crypto.open_task_payload(KEY, "cohort_query", envelope)


def test_open_task_payload_rejects_plaintext_that_is_not_utf8() -> None:
    envelope = crypto.seal_envelope(KEY, b"\xff\xfe\x00", "task:cohort_query")
    with pytest.raises(PayloadRejected, match="plaintext is not JSON"):
        crypto.open_task_payload(KEY, "cohort_query", envelope)


@pytest.mark.parametrize("plaintext", [b"[]", b'"text"', b"42", b"null", b"true"])
def test_open_task_payload_rejects_json_that_is_not_an_object(plaintext: bytes) -> None:
    envelope = crypto.seal_envelope(KEY, plaintext, "task:cohort_query")
    with pytest.raises(PayloadRejected, match="not a JSON object"):
        crypto.open_task_payload(KEY, "cohort_query", envelope)


def test_open_task_payload_rejects_an_envelope_that_is_not_a_string() -> None:
    with pytest.raises(PayloadRejected, match="not a string"):
        crypto.open_task_payload(KEY, "cohort_query", {"payload": "x"})


def test_envelope_of_deeply_nested_json_is_rejected_not_crashing() -> None:
    nested = base64.b64encode(b"[" * 200_000 + b"]" * 200_000).decode()
    assert "not JSON" in rejection(nested)


def test_open_task_payload_rejects_deeply_nested_plaintext() -> None:
    plaintext = b'{"a": ' * 200_000 + b"1" + b"}" * 200_000
    envelope = crypto.seal_envelope(KEY, plaintext, "task:cohort_query")
    with pytest.raises(PayloadRejected, match="plaintext is not JSON"):
        crypto.open_task_payload(KEY, "cohort_query", envelope)
