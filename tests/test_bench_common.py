"""bench.common: finding a server by its port and pinning it, as bench/hit_path does."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from nearvoice.bench.common import listening_pids, pin


def test_the_process_listening_on_a_port_is_found() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        assert os.getpid() not in listening_pids(port)  # bound, not listening yet
        listener.listen()
        assert os.getpid() in listening_pids(port)
    assert os.getpid() not in listening_pids(port)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_pin_holds_every_thread_of_a_process_to_the_cpus_given() -> None:
    code = (
        "import threading, sys\n"
        "threading.Thread(target=sys.stdin.read, daemon=True).start()\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as child:
        try:
            assert child.stdout is not None and child.stdout.readline() == "ready\n"
            cpu = max(os.sched_getaffinity(0))
            pin([child.pid], {cpu})
            tasks = os.listdir(f"/proc/{child.pid}/task")
            assert len(tasks) == 2
            assert all(os.sched_getaffinity(int(task)) == {cpu} for task in tasks)
        finally:
            child.kill()
