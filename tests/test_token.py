"""edge/token.py: signed speech URLs (docs/contracts.md#signed-urls)."""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from http import HTTPStatus
from urllib.parse import parse_qsl, unquote, urlsplit

import pytest

from nearvoice.edge.errors import BadRequest, Forbidden, Gone, RequestError
from nearvoice.edge.formats import AudioFormat
from nearvoice.edge.keyring import Keyring
from nearvoice.edge.policy import Policy
from nearvoice.edge.spec import Spec
from nearvoice.edge.token import (
    Grant,
    _b64d,
    _b64e,
    _mac,
    check_query_shape,
    seal_spec,
    sign_query,
    sign_url,
    speech_path,
    verify,
)

NOW = 1_700_000_000
SKEW = 30.0
BASE = "https://edge.example"
NEW = "new:" + "N" * 32
OLD = "old:" + "O" * 32
TEXT = "The quick brown fox jumps over the lazy dog, secretly."
MODEL = "hibari@" + "cd" * 32


def make_spec(text: str = TEXT, fmt: AudioFormat = AudioFormat.WAV) -> Spec:
    return Spec.create(text=text, voice="heart", format=fmt, model=MODEL)


@pytest.fixture
def ring() -> Keyring:
    return Keyring.parse(f"{NEW},{OLD}")


@pytest.fixture
def spec() -> Spec:
    return make_spec()


def split(url: str) -> tuple[str, str, dict[str, str]]:
    parts = urlsplit(url)
    key = parts.path.rsplit("/", 1)[1].split(".", 1)[0]
    return parts.path, key, dict(parse_qsl(parts.query, keep_blank_values=True))


def check(
    ring: Keyring,
    path: str,
    key: str,
    query: Mapping[str, str],
    *,
    client_ip: str | None = "198.51.100.7",
    now: float = NOW,
) -> Grant:
    return verify(ring, path, key, query, client_ip=client_ip, now=now, skew=SKEW)


def check_url(ring: Keyring, url: str, **kwargs: object) -> Grant:
    path, key, query = split(url)
    return check(ring, path, key, query, **kwargs)  # type: ignore[arg-type]


def signed(
    ring: Keyring, spec: Spec, *, policy: Policy = Policy.HOT, ttl: int = 600, ip: str | None = None
) -> tuple[str, str, dict[str, str]]:
    return (
        speech_path(spec),
        spec.key,
        sign_query(ring, spec, policy=policy, ttl=ttl, ip=ip, now=NOW),
    )


def rejected(
    exc_type: type[RequestError], ring: Keyring, *args: object, **kwargs: object
) -> RequestError:
    with pytest.raises(exc_type) as excinfo:
        check(ring, *args, **kwargs)  # type: ignore[arg-type]
    return excinfo.value


def resign(ring: Keyring, path: str, fields: dict[str, str], kid: str = "new") -> dict[str, str]:
    """Signs arbitrary fields the way sign_query does, to reach checks behind the signature."""
    key = ring.get(kid)
    assert key is not None
    fields = {name: value for name, value in fields.items() if name != "sig"}
    fields["kid"] = kid
    fields["sig"] = _b64e(_mac(key, path, fields))
    return fields


# -- round trips ---------------------------------------------------------------------------


def test_sign_url_then_verify_returns_the_grant(ring: Keyring, spec: Spec) -> None:
    url = sign_url(ring, BASE, spec, policy=Policy.PERSONAL, ttl=600, now=NOW)
    grant = check_url(ring, url)
    assert grant.spec == spec
    assert grant.policy is Policy.PERSONAL
    assert grant.expires == NOW + 600


def test_sign_url_path_is_key_and_extension(ring: Keyring) -> None:
    spec = make_spec(fmt=AudioFormat.OPUS)
    url = sign_url(ring, BASE + "/", spec, policy=Policy.HOT, ttl=60, now=NOW)
    assert urlsplit(url).path == f"/v1/speech/{spec.key}.opus"
    assert url.startswith(f"{BASE}/v1/speech/")


def test_sign_query_has_exactly_the_contract_fields(ring: Keyring, spec: Spec) -> None:
    query = sign_query(ring, spec, policy=Policy.HOT, ttl=60, now=NOW)
    assert list(query) == ["s", "exp", "kid", "p", "sig"]
    assert query["exp"] == str(NOW + 60)
    assert query["kid"] == "new"
    assert query["p"] == "hot"


def test_sign_query_with_ip_adds_a_normalized_network(ring: Keyring, spec: Spec) -> None:
    query = sign_query(ring, spec, policy=Policy.HOT, ttl=60, ip="198.51.100.77/24", now=NOW)
    assert query["ip"] == "198.51.100.0/24"


def test_sign_query_then_verify_with_ip_round_trips(ring: Keyring, spec: Spec) -> None:
    path, key, query = signed(ring, spec, ip="198.51.100.0/24")
    assert check(ring, path, key, query, client_ip="198.51.100.7").spec == spec


def test_sealing_is_randomized(ring: Keyring, spec: Spec) -> None:
    one = sign_query(ring, spec, policy=Policy.HOT, ttl=60, now=NOW)
    two = sign_query(ring, spec, policy=Policy.HOT, ttl=60, now=NOW)
    assert one["s"] != two["s"]


# -- the text stays out of URLs ------------------------------------------------------------


def test_url_does_not_contain_the_text(ring: Keyring, spec: Spec) -> None:
    url = sign_url(ring, BASE, spec, policy=Policy.HOT, ttl=60, now=NOW)
    for word in TEXT.replace(",", "").replace(".", "").split():
        if len(word) >= 4:
            assert word not in unquote(url)


def test_url_does_not_contain_base64_of_the_text(ring: Keyring, spec: Spec) -> None:
    url = unquote(sign_url(ring, BASE, spec, policy=Policy.HOT, ttl=60, now=NOW))
    raw = spec.text.encode()
    for offset in range(3):  # every alignment of the text inside a base64 stream
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            inner = encode(raw[offset:]).decode().rstrip("=")[4:-4]
            assert inner not in url


def test_sealed_spec_bytes_do_not_contain_the_text(ring: Keyring, spec: Spec) -> None:
    query = sign_query(ring, spec, policy=Policy.HOT, ttl=60, now=NOW)
    assert spec.text.encode() not in _b64d(query["s"])
    assert b"heart" not in _b64d(query["s"])


# -- every signed field is bound -----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("exp", str(NOW + 10_000)),
        ("p", "personal"),
        ("ip", "0.0.0.0/0"),
    ],
)
def test_changing_a_signed_field_is_bad_signature(
    ring: Keyring, spec: Spec, name: str, value: str
) -> None:
    path, key, query = signed(ring, spec, ip="198.51.100.0/24")
    query[name] = value
    exc = rejected(Forbidden, ring, path, key, query)
    assert exc.code == "bad_signature"
    assert exc.status == HTTPStatus.FORBIDDEN


def test_swapping_the_sealed_spec_is_bad_signature(ring: Keyring, spec: Spec) -> None:
    path, key, query = signed(ring, spec)
    query["s"] = sign_query(ring, spec, policy=Policy.HOT, ttl=600, now=NOW)["s"]
    assert rejected(Forbidden, ring, path, key, query).code == "bad_signature"


def test_one_flipped_character_in_s_is_bad_signature(ring: Keyring, spec: Spec) -> None:
    path, key, query = signed(ring, spec)
    s = query["s"]
    query["s"] = s[:10] + ("A" if s[10] != "A" else "B") + s[11:]
    assert rejected(Forbidden, ring, path, key, query).code == "bad_signature"


def test_changing_kid_to_another_known_key_is_bad_signature(ring: Keyring, spec: Spec) -> None:
    path, key, query = signed(ring, spec)
    query["kid"] = "old"
    assert rejected(Forbidden, ring, path, key, query).code == "bad_signature"


def test_changing_the_path_key_is_bad_signature(ring: Keyring, spec: Spec) -> None:
    other = make_spec(text="another line")
    _, _, query = signed(ring, spec)
    exc = rejected(Forbidden, ring, speech_path(other), other.key, query)
    assert exc.code == "bad_signature"


def test_changing_the_path_extension_is_bad_signature(ring: Keyring, spec: Spec) -> None:
    path, key, query = signed(ring, spec)
    mp3_path = path.removesuffix(".wav") + ".mp3"
    assert rejected(Forbidden, ring, mp3_path, key, query).code == "bad_signature"


def test_removing_ip_from_a_url_signed_with_ip_is_bad_signature(ring: Keyring, spec: Spec) -> None:
    path, key, query = signed(ring, spec, ip="198.51.100.0/24")
    del query["ip"]
    assert rejected(Forbidden, ring, path, key, query).code == "bad_signature"


def test_adding_ip_to_a_url_signed_without_ip_is_bad_signature(ring: Keyring, spec: Spec) -> None:
    path, key, query = signed(ring, spec)
    query["ip"] = "198.51.100.0/24"
    assert rejected(Forbidden, ring, path, key, query).code == "bad_signature"


def test_changed_signature_is_bad_signature(ring: Keyring, spec: Spec) -> None:
    path, key, query = signed(ring, spec)
    query["sig"] = _b64e(bytes(32))
    assert rejected(Forbidden, ring, path, key, query).code == "bad_signature"


def test_undecodable_signature_is_bad_signature(ring: Keyring, spec: Spec) -> None:
    path, key, query = signed(ring, spec)
    query["sig"] = "x"
    assert rejected(Forbidden, ring, path, key, query).code == "bad_signature"


def test_signature_from_a_different_secret_with_the_same_kid_is_bad_signature(
    spec: Spec,
) -> None:
    forger = Keyring.parse("new:" + "F" * 32)
    path, key, query = signed(forger, spec)
    real = Keyring.parse(NEW)
    assert rejected(Forbidden, real, path, key, query).code == "bad_signature"


# -- expiry --------------------------------------------------------------------------------


def test_expired_url_is_gone(ring: Keyring, spec: Spec) -> None:
    path, key, query = signed(ring, spec, ttl=60)
    exc = rejected(Gone, ring, path, key, query, now=NOW + 60 + SKEW + 1)
    assert exc.code == "expired"
    assert exc.status == HTTPStatus.GONE


def test_url_past_expiry_but_within_clock_skew_is_accepted(ring: Keyring, spec: Spec) -> None:
    path, key, query = signed(ring, spec, ttl=60)
    assert check(ring, path, key, query, now=NOW + 60 + SKEW).spec == spec


def test_url_just_before_expiry_is_accepted(ring: Keyring, spec: Spec) -> None:
    path, key, query = signed(ring, spec, ttl=60)
    assert check(ring, path, key, query, now=NOW + 59).expires == NOW + 60


def test_tampered_exp_on_an_expired_url_is_bad_signature_not_gone(
    ring: Keyring, spec: Spec
) -> None:
    path, key, query = signed(ring, spec, ttl=60)
    query["exp"] = str(NOW + 86400)
    exc = rejected(Forbidden, ring, path, key, query, now=NOW + 3600)
    assert exc.code == "bad_signature"


def test_signed_non_integer_exp_is_bad_request(ring: Keyring, spec: Spec) -> None:
    path, key, query = signed(ring, spec)
    query = resign(ring, path, {**query, "exp": "soon"})
    exc = rejected(BadRequest, ring, path, key, query)
    assert exc.code == "bad_expiry"
    assert exc.status == HTTPStatus.BAD_REQUEST


def test_signed_unknown_policy_is_bad_request(ring: Keyring, spec: Spec) -> None:
    path, key, query = signed(ring, spec)
    query = resign(ring, path, {**query, "p": "forever"})
    assert rejected(BadRequest, ring, path, key, query).code == "bad_policy"


# -- client address binding ----------------------------------------------------------------


def test_client_outside_the_bound_network_is_ip_mismatch(ring: Keyring, spec: Spec) -> None:
    path, key, query = signed(ring, spec, ip="198.51.100.0/24")
    exc = rejected(Forbidden, ring, path, key, query, client_ip="203.0.113.9")
    assert exc.code == "ip_mismatch"
    assert exc.status == HTTPStatus.FORBIDDEN


def test_single_address_binding_accepts_only_that_address(ring: Keyring, spec: Spec) -> None:
    path, key, query = signed(ring, spec, ip="198.51.100.7")
    assert check(ring, path, key, query, client_ip="198.51.100.7").spec == spec
    exc = rejected(Forbidden, ring, path, key, query, client_ip="198.51.100.8")
    assert exc.code == "ip_mismatch"


def test_unknown_client_address_is_ip_mismatch(ring: Keyring, spec: Spec) -> None:
    path, key, query = signed(ring, spec, ip="198.51.100.0/24")
    assert rejected(Forbidden, ring, path, key, query, client_ip=None).code == "ip_mismatch"


def test_unparseable_client_address_is_ip_mismatch(ring: Keyring, spec: Spec) -> None:
    path, key, query = signed(ring, spec, ip="198.51.100.0/24")
    exc = rejected(Forbidden, ring, path, key, query, client_ip="not-an-ip")
    assert exc.code == "ip_mismatch"


def test_ipv6_cidr_accepts_a_client_inside_it(ring: Keyring, spec: Spec) -> None:
    path, key, query = signed(ring, spec, ip="2001:db8:abcd::/48")
    assert check(ring, path, key, query, client_ip="2001:db8:abcd:12::1").spec == spec


def test_ipv6_cidr_rejects_a_client_outside_it(ring: Keyring, spec: Spec) -> None:
    path, key, query = signed(ring, spec, ip="2001:db8:abcd::/48")
    exc = rejected(Forbidden, ring, path, key, query, client_ip="2001:db8:abce::1")
    assert exc.code == "ip_mismatch"


def test_ipv6_cidr_rejects_an_ipv4_client(ring: Keyring, spec: Spec) -> None:
    path, key, query = signed(ring, spec, ip="2001:db8::/32")
    exc = rejected(Forbidden, ring, path, key, query, client_ip="198.51.100.7")
    assert exc.code == "ip_mismatch"


def test_signing_with_a_bad_cidr_raises_value_error(ring: Keyring, spec: Spec) -> None:
    with pytest.raises(ValueError, match="CIDR"):
        sign_query(ring, spec, policy=Policy.HOT, ttl=60, ip="300.1.2.3/8", now=NOW)


def test_signed_unparseable_ip_field_is_bad_request(ring: Keyring, spec: Spec) -> None:
    path, key, query = signed(ring, spec)
    query = resign(ring, path, {**query, "ip": "nonsense"})
    assert rejected(BadRequest, ring, path, key, query).code == "bad_ip"


# -- keys ----------------------------------------------------------------------------------


def test_unknown_kid_is_forbidden(ring: Keyring, spec: Spec) -> None:
    path, key, query = signed(ring, spec)
    query["kid"] = "retired"
    exc = rejected(Forbidden, ring, path, key, query)
    assert exc.code == "unknown_kid"
    assert exc.status == HTTPStatus.FORBIDDEN


def test_url_signed_by_the_old_key_verifies_after_rotation(spec: Spec) -> None:
    before = Keyring.parse(OLD)
    url = sign_url(before, BASE, spec, policy=Policy.HOT, ttl=600, now=NOW)
    after = Keyring.parse(f"{NEW},{OLD}")
    assert after.signer.kid == "new"
    assert check_url(after, url).spec == spec


def test_url_signed_by_a_removed_key_is_unknown_kid(spec: Spec) -> None:
    url = sign_url(Keyring.parse(OLD), BASE, spec, policy=Policy.HOT, ttl=600, now=NOW)
    path, key, query = split(url)
    exc = rejected(Forbidden, Keyring.parse(NEW), path, key, query)
    assert exc.code == "unknown_kid"


def test_validly_signed_url_whose_key_is_not_the_spec_hash_is_key_mismatch(
    ring: Keyring, spec: Spec
) -> None:
    other = make_spec(text="a different line")
    signer = ring.signer
    fields = {"s": seal_spec(signer, spec), "exp": str(NOW + 600), "kid": signer.kid, "p": "hot"}
    path = speech_path(other)
    fields["sig"] = _b64e(_mac(signer, path, fields))
    exc = rejected(Forbidden, ring, path, other.key, fields)
    assert exc.code == "key_mismatch"
    assert exc.status == HTTPStatus.FORBIDDEN


def test_validly_signed_garbage_seal_is_bad_seal(ring: Keyring, spec: Spec) -> None:
    path, key, query = signed(ring, spec)
    query = resign(ring, path, {**query, "s": _b64e(os.urandom(64))})
    assert rejected(Forbidden, ring, path, key, query).code == "bad_seal"


def test_spec_sealed_under_another_kid_does_not_unseal(ring: Keyring, spec: Spec) -> None:
    path, key, query = signed(ring, spec)
    old = ring.get("old")
    assert old is not None
    query = resign(ring, path, {**query, "s": seal_spec(old, spec)})
    assert rejected(Forbidden, ring, path, key, query).code == "bad_seal"


def test_validly_sealed_invalid_spec_is_bad_request(ring: Keyring, spec: Spec) -> None:
    signer = ring.signer
    bad = spec.to_json().replace(b'"speed":1.0', b'"speed":9.0')
    nonce = os.urandom(12)
    sealed = _b64e(nonce + signer.seal.encrypt(nonce, bad, signer.kid.encode()))
    path, key, query = signed(ring, spec)
    query = resign(ring, path, {**query, "s": sealed})
    exc = rejected(BadRequest, ring, path, key, query)
    assert exc.code == "bad_speed"


# -- query shape ---------------------------------------------------------------------------


def good_query() -> dict[str, str]:
    return {"s": "x", "exp": "1", "kid": "k", "p": "hot", "sig": "y"}


def test_check_query_shape_accepts_a_complete_query() -> None:
    check_query_shape(good_query(), repeated=False)
    check_query_shape({**good_query(), "ip": "1.2.3.4"}, repeated=False)


def test_check_query_shape_unknown_parameter_is_bad_request() -> None:
    with pytest.raises(BadRequest) as excinfo:
        check_query_shape({**good_query(), "utm_source": "x"}, repeated=False)
    assert excinfo.value.code == "unknown_parameter"
    assert excinfo.value.status == HTTPStatus.BAD_REQUEST


def test_check_query_shape_repeated_parameter_is_bad_request() -> None:
    with pytest.raises(BadRequest) as excinfo:
        check_query_shape(good_query(), repeated=True)
    assert excinfo.value.code == "repeated_parameter"


def test_check_query_shape_missing_sig_is_bad_signature() -> None:
    query = good_query()
    del query["sig"]
    with pytest.raises(Forbidden) as excinfo:
        check_query_shape(query, repeated=False)
    assert excinfo.value.code == "bad_signature"
    assert excinfo.value.status == HTTPStatus.FORBIDDEN


@pytest.mark.parametrize("name", ["s", "exp", "kid", "p"])
def test_check_query_shape_missing_field_is_missing_parameter(name: str) -> None:
    query = good_query()
    del query[name]
    with pytest.raises(BadRequest) as excinfo:
        check_query_shape(query, repeated=False)
    assert excinfo.value.code == "missing_parameter"
    assert name in excinfo.value.message


def test_check_query_shape_unknown_parameter_wins_over_missing_sig() -> None:
    with pytest.raises(BadRequest) as excinfo:
        check_query_shape({"text": "hello"}, repeated=False)
    assert excinfo.value.code == "unknown_parameter"


# -- strictness ----------------------------------------------------------------------------


def test_non_canonical_base64_spelling_of_the_signature_is_rejected(
    ring: Keyring, spec: Spec
) -> None:
    path, key, query = signed(ring, spec)
    # A character outside the alphabet would be skipped by a lax decoder.
    query["sig"] = query["sig"][:10] + "!" + query["sig"][10:]
    assert rejected(Forbidden, ring, path, key, query).code == "bad_signature"


def test_ipv4_mapped_client_address_matches_an_ipv4_binding(ring: Keyring, spec: Spec) -> None:
    path, key, query = signed(ring, spec, ip="203.0.113.0/24")
    assert check(ring, path, key, query, client_ip="::ffff:203.0.113.5").spec == spec


def test_ipv4_mapped_client_address_outside_the_binding_is_rejected(
    ring: Keyring, spec: Spec
) -> None:
    path, key, query = signed(ring, spec, ip="203.0.113.0/24")
    exc = rejected(Forbidden, ring, path, key, query, client_ip="::ffff:198.51.100.7")
    assert exc.code == "ip_mismatch"
