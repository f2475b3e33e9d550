"""Realtime sessions per tenant counted for the node (edge.seats): two workers' views of one
seats file, as `--workers 2` maps it."""

from __future__ import annotations

from pathlib import Path

import pytest

from nearvoice.edge.seats import Seats, SharedSeats

TENANTS = ("acme", "limited")


def test_seats_in_one_process_stop_at_the_limit() -> None:
    seats = Seats()
    assert seats.enter("acme", 2) and seats.enter("acme", 2)
    assert not seats.enter("acme", 2)
    assert seats.enter("limited", 2)  # another tenant's seats are its own
    seats.leave("acme")
    assert seats.enter("acme", 2)


def test_workers_share_a_tenants_seats(tmp_path: Path) -> None:
    path = tmp_path / "realtime.seats"
    first = SharedSeats(path, TENANTS, workers=2, worker=0)
    second = SharedSeats(path, TENANTS, workers=2, worker=1)
    try:
        assert first.enter("acme", 2)
        assert second.enter("acme", 2)
        assert not first.enter("acme", 2)
        assert not second.enter("acme", 2)
        assert second.enter("limited", 1)
        assert not first.enter("limited", 1)
        first.leave("acme")  # a seat given back in one worker is free in the other
        assert second.enter("acme", 2)
        assert not first.enter("acme", 2)
    finally:
        first.close()
        second.close()


def test_a_restarted_worker_forgets_the_seats_of_its_previous_life(tmp_path: Path) -> None:
    path = tmp_path / "realtime.seats"
    survivor = SharedSeats(path, TENANTS, workers=2, worker=0)
    died = SharedSeats(path, TENANTS, workers=2, worker=1)
    try:
        assert survivor.enter("acme", 3)
        assert died.enter("acme", 3) and died.enter("acme", 3)
        died.close()  # killed: its sessions' connections went with it, never left
        assert not survivor.enter("acme", 3)
        died = SharedSeats(path, TENANTS, workers=2, worker=1)
        assert survivor.enter("acme", 3)  # the survivor's seat is still counted
        assert died.enter("acme", 3)
        assert not died.enter("acme", 3)
    finally:
        survivor.close()
        died.close()


def test_a_tenant_without_a_row_is_counted_in_its_worker(tmp_path: Path) -> None:
    seats = SharedSeats(tmp_path / "realtime.seats", TENANTS, workers=2, worker=0)
    try:
        assert seats.enter("gone", 1)
        assert not seats.enter("gone", 1)
        seats.leave("gone")
        assert seats.enter("gone", 1)
    finally:
        seats.close()
    seats.leave("acme")  # after close: ignored


def test_a_worker_index_outside_the_node_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        SharedSeats(tmp_path / "realtime.seats", TENANTS, workers=2, worker=2)
