"""edge/keyring.py: NEARVOICE_KEYS parsing and key generation (docs/contracts.md#signed-urls)."""

from __future__ import annotations

import pytest

from nearvoice.edge.keyring import KEYS_ENV, Keyring, KeyringError, SigningKey, generate_pair

SECRET_A = "a" * 32
SECRET_B = "b" * 32


def test_parse_reads_every_pair_in_order() -> None:
    ring = Keyring.parse(f"kid1:{SECRET_A},kid2:{SECRET_B}")
    assert ring.kids == ["kid1", "kid2"]


def test_first_key_signs() -> None:
    ring = Keyring.parse(f"new:{SECRET_A},old:{SECRET_B}")
    assert ring.signer.kid == "new"


def test_get_returns_the_key_for_its_kid() -> None:
    ring = Keyring.parse(f"kid1:{SECRET_A},kid2:{SECRET_B}")
    key = ring.get("kid2")
    assert key is not None
    assert key.kid == "kid2"
    assert key.sign_key == SigningKey.from_secret("kid2", SECRET_B).sign_key


def test_get_unknown_kid_returns_none() -> None:
    assert Keyring.parse(f"kid1:{SECRET_A}").get("kid9") is None


def test_different_secrets_derive_different_keys() -> None:
    ring = Keyring.parse(f"kid1:{SECRET_A},kid2:{SECRET_B}")
    one, two = ring.get("kid1"), ring.get("kid2")
    assert one is not None and two is not None
    assert one.sign_key != two.sign_key


def test_same_secret_derives_the_same_signing_key() -> None:
    assert (
        SigningKey.from_secret("x", SECRET_A).sign_key
        == SigningKey.from_secret("y", SECRET_A).sign_key
    )


def test_whitespace_and_empty_entries_are_tolerated() -> None:
    ring = Keyring.parse(f" kid1 : {SECRET_A} ,, kid2:{SECRET_B},")
    assert ring.kids == ["kid1", "kid2"]


def test_secret_may_contain_colons() -> None:
    ring = Keyring.parse("kid1:abc:defghijklmnopqrstu")
    key = ring.get("kid1")
    assert key is not None
    assert key.sign_key == SigningKey.from_secret("kid1", "abc:defghijklmnopqrstu").sign_key


def test_duplicate_kid_is_an_error() -> None:
    with pytest.raises(KeyringError, match="duplicate"):
        Keyring.parse(f"kid1:{SECRET_A},kid1:{SECRET_B}")


def test_short_secret_is_an_error() -> None:
    with pytest.raises(KeyringError, match="shorter"):
        Keyring.parse("kid1:" + "x" * 15)


def test_secret_of_minimum_length_is_accepted() -> None:
    assert Keyring.parse("kid1:" + "x" * 16).kids == ["kid1"]


@pytest.mark.parametrize("kid", ["bad kid", "bad/kid", "k\u00e9y", "x" * 33, "a+b"])
def test_bad_kid_characters_are_an_error(kid: str) -> None:
    with pytest.raises(KeyringError, match="key id"):
        Keyring.parse(f"{kid}:{SECRET_A}")


def test_empty_kid_is_an_error() -> None:
    with pytest.raises(KeyringError):
        Keyring.parse(f":{SECRET_A}")


def test_entry_without_colon_is_an_error() -> None:
    with pytest.raises(KeyringError, match="kid:secret"):
        Keyring.parse("justasecretwithoutakid")


@pytest.mark.parametrize("value", ["", "   ", ",", " , , "])
def test_empty_value_is_an_error(value: str) -> None:
    with pytest.raises(KeyringError, match="no signing keys"):
        Keyring.parse(value)


def test_from_env_reads_nearvoice_keys() -> None:
    ring = Keyring.from_env({KEYS_ENV: f"envkid:{SECRET_A}"})
    assert ring.kids == ["envkid"]


def test_from_env_without_the_variable_is_an_error() -> None:
    with pytest.raises(KeyringError, match=KEYS_ENV):
        Keyring.from_env({})


def test_generate_pair_output_parses() -> None:
    pair = generate_pair()
    ring = Keyring.parse(pair)
    kid, _, secret = pair.partition(":")
    assert ring.kids == [kid]
    assert len(secret) >= 43  # 256 bits in unpadded base64url


def test_generate_pair_is_random() -> None:
    assert generate_pair() != generate_pair()


def test_two_generated_pairs_form_a_keyring() -> None:
    ring = Keyring.parse(f"{generate_pair()},{generate_pair()}")
    assert len(ring.kids) == 2
