"""What `nearvoice up` tells its operator: the banner never shows a secret, and when one
tier dies the report names the tier, how it ended (exit status or signal) and its last
words. The tiers here are real child processes that die on purpose."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from nearvoice.edge.config import MINT_TOKEN_ENV
from nearvoice.edge.stack import Tier, banner, watch

URLS = ("http://127.0.0.1:8080", "http://127.0.0.1:8081", "http://127.0.0.1:8082")
SECRET = "mint-token-that-must-not-be-printed"


def test_the_banner_names_where_the_mint_token_is_never_the_token(tmp_path: Path) -> None:
    (tmp_path / "mint-token").write_text(SECRET + "\n")
    from_env = banner(tmp_path, URLS, "http://edge/sample", mint_from_env=True)
    from_file = banner(tmp_path, URLS, "http://edge/sample", mint_from_env=False)
    assert SECRET not in from_env and SECRET not in from_file
    assert f"Bearer ${MINT_TOKEN_ENV}" in from_env
    assert f"Bearer $(cat {tmp_path}/mint-token)" in from_file
    assert "http://127.0.0.1:8082/v1/speech" in from_env


def _tier(role: str, port: int, code: str) -> Tier:
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    tier = Tier(role, port, proc)
    tier.start_relay()
    return tier


def test_a_tier_that_exits_is_named_with_its_status_and_last_words() -> None:
    alive = _tier("edge", 8080, "import time; time.sleep(60)")
    dying = _tier(
        "shield",
        8081,
        "import sys; print('loading', file=sys.stderr); "
        "print('OSError: [Errno 28] No space left on device', file=sys.stderr); sys.exit(3)",
    )
    try:
        died = watch([alive, dying], lambda: False, interval=0.01)
        assert died is dying
        report = died.death()
    finally:
        alive.proc.kill()
        alive.death()
    assert report.startswith(f"the shield tier (port 8081, pid {dying.proc.pid}) exited with")
    assert "exited with status 3" in report
    assert "No space left on device" in report


def test_a_tier_killed_by_a_signal_says_which() -> None:
    tier = _tier("origin", 8082, "import time; time.sleep(60)")
    tier.proc.send_signal(signal.SIGKILL)
    assert watch([tier], lambda: False, interval=0.01) is tier
    assert "the origin tier (port 8082" in tier.death()
    assert "was killed by SIGKILL" in tier.death()


def test_watch_returns_none_when_the_stack_is_stopped() -> None:
    tier = _tier("edge", 8080, "import time; time.sleep(60)")
    try:
        assert watch([tier], lambda: True) is None
    finally:
        tier.proc.kill()
        tier.death()
