"""Node-to-node signatures (edge.nodeauth) that cannot be replayed: bound to the method,
the target and the destination, used once (a nonce remembered until the stamp expires,
shared by a node's workers through SQLite), and the first format accepted only within
`[nodeauth] legacy_until`. Unit tests on the verifier, then a real node over loopback."""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient
from yarl import URL

from nearvoice.edge.app import create_app
from nearvoice.edge.nodeauth import (
    MAX_AGE,
    NODE_HEADER,
    NodeAuthSettings,
    NodeVerifier,
    NonceStore,
    destination,
    local_names,
    sign_legacy,
    sign_node_request,
)
from tests.support import EdgeTestServer, make_config, make_keyring, make_spec, sign

Client = TestClient[Any, Any]
KEYRING = make_keyring()
OTHER = make_keyring("test1:another-secret-that-is-long-enough-9999")
BASE = "https://shield.example:8443"
TARGET = "/v1/speech/" + "a" * 64 + ".wav?s=x&exp=1&kid=test1&p=hot&sig=y"


def verifier(store: NonceStore | None = None, legacy_until: float = 0.0) -> NodeVerifier:
    return NodeVerifier(KEYRING, (BASE,), store or NonceStore(None), legacy_until)


def test_a_signature_verifies_once() -> None:
    check = verifier()
    value = sign_node_request(KEYRING, "GET", TARGET, BASE)
    assert check.verify(value, "GET", TARGET)
    assert not check.verify(value, "GET", TARGET)  # the replay


def test_each_signature_has_its_own_nonce() -> None:
    check = verifier()
    first = sign_node_request(KEYRING, "GET", TARGET, BASE)
    second = sign_node_request(KEYRING, "GET", TARGET, BASE)
    assert first != second
    assert check.verify(first, "GET", TARGET) and check.verify(second, "GET", TARGET)


@pytest.mark.parametrize(
    "other",
    ["https://edge.example:8443", "http://shield.example:8443", "https://shield.example:8444"],
)
def test_a_signature_for_another_destination_is_refused(other: str) -> None:
    assert not verifier().verify(sign_node_request(KEYRING, "GET", TARGET, other), "GET", TARGET)


def test_destinations_compare_canonically() -> None:
    assert destination("HTTPS://Shield.Example/") == "https://shield.example:443"
    assert destination("http://[::1]:81") == "http://[::1]:81"
    value = sign_node_request(KEYRING, "GET", TARGET, "https://SHIELD.example:8443/")
    assert verifier().verify(value, "GET", TARGET)


def test_the_socket_address_is_a_destination_too() -> None:
    check = NodeVerifier(KEYRING, (), NonceStore(None))
    value = sign_node_request(KEYRING, "GET", TARGET, "http://localhost:9001")
    assert not check.verify(value, "GET", TARGET)
    local = local_names("http", ("127.0.0.1", 9001))
    assert check.verify(value, "GET", TARGET, local=local)


@pytest.mark.parametrize("age", [MAX_AGE + 5, -(MAX_AGE + 5), 86400.0])
def test_old_or_future_stamps_are_refused(age: float) -> None:
    now = time.time()
    value = sign_node_request(KEYRING, "GET", TARGET, BASE, now=now - age)
    assert not verifier().verify(value, "GET", TARGET, now=now)


def test_other_secret_target_or_method_is_refused() -> None:
    check = verifier()
    assert not check.verify(sign_node_request(OTHER, "GET", TARGET, BASE), "GET", TARGET)
    value = sign_node_request(KEYRING, "GET", TARGET, BASE)
    assert not check.verify(value, "GET", TARGET.replace("p=hot", "p=draft"))
    assert not check.verify(value, "HEAD", TARGET)


def test_a_rotated_verifying_key_still_verifies() -> None:
    old = make_keyring("old:old-secret-that-is-long-enough-0000")
    rotated = make_keyring(
        "new:new-secret-that-is-long-enough-1111", "old:old-secret-that-is-long-enough-0000"
    )
    check = NodeVerifier(rotated, (BASE,), NonceStore(None))
    assert check.verify(sign_node_request(old, "GET", TARGET, BASE), "GET", TARGET)


@pytest.mark.parametrize(
    "value",
    ["", "v2", "v2::::", "v2:test1:{now}::c2ln", "v2:test1:²:bm9uY2U:c2ln",
     "v2:test1:{now}:bm9uY2U:!!!", "v3:test1:{now}:bm9uY2U:c2ln", "x" * 1000,
     "test1:{now}:c2ln", "v2:nokid:{now}:bm9uY2U:c2ln"],
)  # fmt: skip
def test_malformed_values_are_refused(value: str) -> None:
    value = value.replace("{now}", str(int(time.time())))
    assert not verifier(legacy_until=time.time() + 3600).verify(value, "GET", TARGET)


def test_the_first_format_is_accepted_only_within_the_transition_window() -> None:
    value = sign_legacy(KEYRING, "GET", TARGET)
    assert not verifier().verify(value, "GET", TARGET)
    assert verifier(legacy_until=time.time() + 60).verify(value, "GET", TARGET)
    assert not verifier(legacy_until=time.time() - 1).verify(value, "GET", TARGET)


def _verify_in_another_process(path: str, value: str) -> bool:
    check = NodeVerifier(KEYRING, (BASE,), NonceStore(Path(path)))
    return check.verify(value, "GET", TARGET)


def test_workers_sharing_the_nonce_file_accept_a_signature_once(tmp_path: Path) -> None:
    path = tmp_path / "nonces.sqlite"
    values = [sign_node_request(KEYRING, "GET", TARGET, BASE) for _ in range(5)]
    with ProcessPoolExecutor(4) as pool:
        # Each value is offered to four processes; exactly one of them accepts it.
        for value in values:
            accepted = list(pool.map(_verify_in_another_process, [str(path)] * 4, [value] * 4))
            assert accepted.count(True) == 1, accepted


def test_nonces_are_forgotten_once_their_stamp_expired(tmp_path: Path) -> None:
    store = NonceStore(tmp_path / "n.sqlite")
    now = time.time()
    assert store.first_use("n1", now + 1, now)
    assert not store.first_use("n1", now + 1, now)
    assert store.first_use("n2", now + 1, now + 2 * MAX_AGE)  # purges n1
    assert store.first_use("n1", now + 3 * MAX_AGE, now + 2 * MAX_AGE)
    store.close()


# -- on a real node ------------------------------------------------------------------------


async def test_a_captured_header_bypasses_the_ip_binding_at_most_once(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    app = create_app(make_config(tmp_path), KEYRING, engines=[])
    client = await aiohttp_client(EdgeTestServer(app))
    url = sign(KEYRING, make_spec("replay"), ip="192.0.2.1/32")
    base = f"http://127.0.0.1:{client.port}"
    captured = {NODE_HEADER: sign_node_request(KEYRING, "GET", url, base)}
    exact = URL(base + url, encoded=True)  # sent exactly as signed
    async with client.session.get(exact, headers=captured) as resp:
        assert resp.status == 503  # vouched for; no engine, no upstream: cannot be made
    async with client.session.get(exact, headers=captured) as resp:
        assert resp.status == 403  # the replay: the URL's ip binding applies again
        assert (await resp.json())["error"] == "ip_mismatch"
    elsewhere = {NODE_HEADER: sign_node_request(KEYRING, "GET", url, "http://127.0.0.1:1")}
    async with client.session.get(exact, headers=elsewhere) as resp:
        assert resp.status == 403


async def test_a_configured_audience_accepts_the_balancers_name(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    settings = NodeAuthSettings(audience=("https://shields.example",))
    app = create_app(make_config(tmp_path, nodeauth=settings), KEYRING, engines=[])
    client = await aiohttp_client(EdgeTestServer(app))
    url = sign(KEYRING, make_spec("audience"), ip="192.0.2.1/32")
    header = {NODE_HEADER: sign_node_request(KEYRING, "GET", url, "https://shields.example")}
    exact = URL(f"http://127.0.0.1:{client.port}{url}", encoded=True)
    async with client.session.get(exact, headers=header) as resp:
        assert resp.status == 503


def _open_at_once(path: str, barrier: Any, results: Any) -> None:
    barrier.wait(30)
    try:
        NonceStore(Path(path)).close()
        results.put("opened")
    except Exception as exc:  # reported to the test, which names it
        results.put(f"{type(exc).__name__}: {exc}")


def test_workers_opening_a_new_nonce_file_at_once_all_open_it(tmp_path: Path) -> None:
    """A node's workers start together and open the same new file: none may fail."""
    context = multiprocessing.get_context("fork")
    for round_ in range(5):
        path = str(tmp_path / f"nonces-{round_}.sqlite")
        barrier, results = context.Barrier(6), context.Queue()
        workers = [
            context.Process(target=_open_at_once, args=(path, barrier, results)) for _ in range(6)
        ]
        for worker in workers:
            worker.start()
        outcomes = [results.get(timeout=60) for _ in workers]
        for worker in workers:
            worker.join(30)
        assert outcomes == ["opened"] * 6
