"""The signature verifiers: the Standard Webhooks known-answer vector, the reference package
(`standardwebhooks`) as an oracle over generated cases, and the generic body HMAC."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from standardwebhooks import Webhook, WebhookVerificationError

from bridge.errors import PayloadError
from bridge.ingress.signatures import decode_secret, sign, verify_body_hmac, verify_standard

# The known-answer vector published with the Standard Webhooks specification (and used by
# every reference library's tests).
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TIMESTAMP = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def headers(message_id=VECTOR_ID, timestamp=VECTOR_TIMESTAMP, signature=VECTOR_SIGNATURE):
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
    }


def verify(hdrs, body=VECTOR_BODY, secrets=(VECTOR_SECRET,), now=VECTOR_TIMESTAMP, tol=300.0):
    return verify_standard(hdrs, body, [decode_secret(s) for s in secrets], now, tol)


def test_the_known_answer_vector_signs_and_verifies():
    key = decode_secret(VECTOR_SECRET)
    assert sign(key, VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY) == VECTOR_SIGNATURE
    signed = verify(headers())
    assert (signed.message_id, signed.timestamp) == (VECTOR_ID, VECTOR_TIMESTAMP)
    # The prefix is optional, as in the reference libraries.
    assert verify(headers(), secrets=(VECTOR_SECRET.removeprefix("whsec_"),))


def test_svix_named_headers_are_read_too():
    svix = {k.replace("webhook-", "svix-"): v for k, v in headers().items()}
    assert verify(svix).message_id == VECTOR_ID


@pytest.mark.parametrize(
    ("hdrs", "body", "now", "code"),
    [
        ({}, VECTOR_BODY, VECTOR_TIMESTAMP, "signature_missing"),
        (headers(signature=""), VECTOR_BODY, VECTOR_TIMESTAMP, "signature_missing"),
        (headers(), b'{"test": 2432232315}', VECTOR_TIMESTAMP, "signature_invalid"),
        (headers(message_id="msg_other"), VECTOR_BODY, VECTOR_TIMESTAMP, "signature_invalid"),
        (headers(timestamp="12x"), VECTOR_BODY, VECTOR_TIMESTAMP, "signature_invalid"),
        (headers(message_id="m" * 300), VECTOR_BODY, VECTOR_TIMESTAMP, "signature_invalid"),
        (
            headers(signature=VECTOR_SIGNATURE.replace("v1,", "v2,")),
            VECTOR_BODY,
            VECTOR_TIMESTAMP,
            "signature_invalid",
        ),
        # The tolerance holds both ways: too old and too far in the future.
        (headers(), VECTOR_BODY, VECTOR_TIMESTAMP + 301, "signature_expired"),
        (headers(), VECTOR_BODY, VECTOR_TIMESTAMP - 301, "signature_expired"),
    ],
)
def test_refusals_carry_a_stable_code(hdrs, body, now, code):
    with pytest.raises(PayloadError) as refused:
        verify(hdrs, body=body, now=now)
    assert (refused.value.status, refused.value.code) == (401, code)


def test_within_tolerance_either_way_is_accepted():
    assert verify(headers(), now=VECTOR_TIMESTAMP + 300)
    assert verify(headers(), now=VECTOR_TIMESTAMP - 300)


def test_rotation_several_signatures_and_several_secrets():
    other = "whsec_" + base64.b64encode(b"x" * 32).decode()
    other_sig = sign(decode_secret(other), VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY)
    # The sender signs with old and new secrets during its rotation...
    assert verify(headers(signature=f"{other_sig} {VECTOR_SIGNATURE}"))
    # ...and the receiver holds old and new during its own.
    assert verify(headers(signature=other_sig), secrets=(VECTOR_SECRET, other))
    with pytest.raises(PayloadError):
        verify(headers(signature=other_sig))


@pytest.mark.parametrize("secret", ["whsec_not base64!", "whsec_c2hvcnQ=", ""])
def test_bad_secrets_are_refused_without_being_repeated(secret):
    with pytest.raises(ValueError) as refused:
        decode_secret(secret)
    assert secret.removeprefix("whsec_") not in str(refused.value) or not secret


# --- the reference package as an oracle ------------------------------------------------------

keys = st.binary(min_size=16, max_size=64)
message_ids = st.text(
    st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=" "),
    min_size=1,
    max_size=40,
)
bodies = st.one_of(
    st.binary(max_size=300).map(lambda b: b.decode("latin-1").encode()),
    st.text(max_size=200).map(str.encode),
)
# Clock offsets well away from the 300 s edge, since the oracle reads its own clock.
near = st.integers(-290, 290)
offsets = st.one_of(near, near, near, st.integers(310, 10**6), st.integers(-(10**6), -310))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@st.composite
def signed_requests(draw):
    """A request signed by the right key, a wrong key, or tampered with; with extra or
    rotated signatures around the real one."""
    key = draw(keys)
    message_id = draw(message_ids)
    body = draw(bodies)
    now = int(time.time())
    timestamp = now + draw(offsets)
    signing_key = draw(st.sampled_from([key, key, key, b"0" * 16 + key]))
    signed_body = draw(st.sampled_from([body, body, body, body + b" "]))
    real = sign(signing_key, message_id, timestamp, signed_body)
    noise = draw(
        st.lists(
            st.builds(
                lambda v, raw: f"{v},{b64(raw)}",
                st.sampled_from(["v1", "v1a", "v2"]),
                st.binary(min_size=32, max_size=32),
            ),
            max_size=3,
        )
    )
    sigs = [*noise, real] if draw(st.booleans()) else [real, *noise]
    hdrs = {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(sigs),
    }
    return key, hdrs, body


def oracle_accepts(key: bytes, hdrs: dict[str, str], body: bytes) -> bool:
    try:
        Webhook(key).verify(body, hdrs, json_parse=False)
    except WebhookVerificationError:
        return False
    return True


def ours_accepts(key: bytes, hdrs: dict[str, str], body: bytes) -> bool:
    try:
        verify_standard(hdrs, body, [key], time.time(), 300.0)
    except PayloadError:
        return False
    return True


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(signed_requests())
def test_the_verifier_agrees_with_the_reference_package(case):
    key, hdrs, body = case
    verdict = oracle_accepts(key, hdrs, body)
    event("accepted" if verdict else "refused")
    assert ours_accepts(key, hdrs, body) == verdict


@settings(max_examples=100, deadline=None)
@given(keys, message_ids, bodies, st.integers(0, 2**33))
def test_our_signatures_are_the_reference_packages(key, message_id, body, timestamp):
    expected = Webhook(key).sign(
        message_id, datetime.fromtimestamp(timestamp, UTC), body.decode("utf-8")
    )
    assert sign(key, message_id, timestamp, body) == expected


# --- generic HMAC of the body ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "encoding", "prefix"),
    [("sha256", "hex", "sha256="), ("sha1", "hex", ""), ("sha512", "base64", "")],
)
def test_body_hmac_accepts_any_active_secret(algorithm, encoding, prefix):
    body = b'{"type": "open"}'
    secret = b"a-generic-hmac-secret"
    digest = hmac.new(secret, body, getattr(hashlib, algorithm)).digest()
    value = prefix + (digest.hex() if encoding == "hex" else b64(digest))
    options = {"algorithm": algorithm, "encoding": encoding, "prefix": prefix}
    verify_body_hmac(value, body, [b"old-secret-0123456789", secret], **options)
    with pytest.raises(PayloadError) as refused:
        verify_body_hmac(value, body + b" ", [secret], **options)
    assert refused.value.code == "signature_invalid"
    with pytest.raises(PayloadError) as refused:
        verify_body_hmac(None, body, [secret], **options)
    assert refused.value.code == "signature_missing"


header_text = st.text(max_size=60) | st.from_regex(
    r"v1,[A-Za-z0-9+/=]{0,50}( v1,[A-Za-z0-9+/=]{0,50})*"
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["webhook-id", "webhook-timestamp", "webhook-signature", "svix-id"]),
        header_text | st.integers(0, 2**40).map(str),
    ),
    st.binary(max_size=100),
)
def test_any_header_garbage_is_a_401_never_a_crash(hdrs, body):
    key = decode_secret(VECTOR_SECRET)
    try:
        verify_standard(hdrs, body, [key], VECTOR_TIMESTAMP, 300.0)
    except PayloadError as exc:
        assert exc.status == 401
    else:  # only with a real signature, which random text does not make
        raise AssertionError(f"accepted {hdrs!r}")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80), st.sampled_from(["127.0.0.1", "10.0.0.1", "::1", "", "x"]))
def test_any_forwarded_for_yields_an_address_or_none(forwarded, peer):
    import ipaddress

    from bridge.ingress.auth import check_address, client_address

    proxies = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
    address = client_address(peer, forwarded, proxies)
    assert address is None or isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address)
    try:
        check_address(address, [ipaddress.ip_network("10.0.0.0/8")])
    except PayloadError as exc:
        assert exc.code == "ip_forbidden"
