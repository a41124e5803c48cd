"""End to end: headless Chromium → mitmdump + addon → our WireGuard → wireguard-go → origin.

Chromium runs inside the client namespace with ``--proxy-server`` pointing at mitmdump and
trusts mitmproxy's CA by its public key (``--ignore-certificate-errors-spki-list`` with the
CA's SPKI hash; mitmproxy signs every leaf with the CA key pair, so nothing else is trusted
blindly). It loads https://exit.test/ (tests/data/e2e/: a stylesheet, an image, a deferred
script that waits for the image, fetches JSON from the origin and writes a report into the
DOM). ``--virtual-time-budget`` lets that fetch finish before ``--dump-dom`` and
``--screenshot`` capture the page.
"""

from __future__ import annotations

import html
import json
import logging
import re
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import e2e_helpers
import pytest
from e2e_helpers import (
    ORIGIN_NAME,
    Mitmdump,
    Origin,
    chromium_binary,
    png_pixels,
    png_size,
    run_chromium,
    run_mitmdump,
    write_client_config,
)

TUNNEL = "exit"
PAGE_RESOURCES = ["/", "/style.css", "/app.js", "/pixel.png", "/echo/from-script?n=1"]
BACKGROUND = (250, 245, 230)  # style.css body
TITLE = (12, 34, 56)  # style.css #title
GREEN = (0, 160, 90)  # make_png() default, drawn 64×64 by index.html


@pytest.fixture(scope="module")
def proxy(exit_peer: Any, workdir: Path, origin: Origin) -> Iterator[Mitmdump]:
    if chromium_binary() is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    conf = write_client_config(exit_peer, workdir, TUNNEL)
    with run_mitmdump(
        exit_peer.client_ns,
        workdir,
        "--set",
        f"wg_conf={TUNNEL}={conf}",
        "--set",
        f"ssl_verify_upstream_trusted_ca={origin.ca}",
    ) as dump:
        dump.wait_for_log(f"WireGuard tunnel {TUNNEL!r} is up")
        yield dump


def test_page_with_subresources_and_fetch(
    exit_peer: Any, origin: Origin, proxy: Mitmdump, workdir: Path
) -> None:
    shot = workdir / "page.png"
    seen_before = len(origin.requests())
    run = run_chromium(
        exit_peer.client_ns,
        workdir,
        proxy.port,
        proxy.spki_hash(),
        "--window-size=800,600",
        "--virtual-time-budget=15000",
        "--dump-dom",
        f"--screenshot={shot}",
        f"https://{ORIGIN_NAME}/",
    )
    # Chromium exits 0 with an empty DOM when the page never loaded: whatever fails below
    # carries its exit code and the last lines of its stderr.
    with run.diagnose():
        assert run.returncode == 0

        # The final DOM: the page script ran, the CSS applied, the image decoded, the fetch
        # answered with what the origin saw.
        match = re.search(r'<pre id="result"[^>]*>(.*?)</pre>', run.stdout, re.S)
        assert match, run.stdout[-2000:]
        report = json.loads(html.unescape(match.group(1)))
        assert report["css_color"] == "rgb(12, 34, 56)"
        assert report["image_width"] == 16
        assert report["fetch_status"] == 200
        tunnel_addresses = {exit_peer.client_tunnel_v4, exit_peer.client_tunnel_v6}
        assert report["echo"]["client"] in tunnel_addresses
        assert report["echo"]["headers"]["x-from-page"] == "app.js"
        assert report["echo"]["proto"] == "h2"  # Chromium ⇄ mitmproxy ⇄ origin all in h2
        assert "HeadlessChrome" in report["echo"]["headers"]["user-agent"]

        # The origin logged the page and every subresource, each from our tunnel address.
        seen = origin.requests()[seen_before:]
        by_path = {r["path"]: r for r in seen}
        missing = [p for p in PAGE_RESOURCES if p not in by_path]
        assert not missing, [r["path"] for r in seen]
        assert {r["client"] for r in seen} <= tunnel_addresses
        assert {c["client"] for c in origin.entries("connect")} <= tunnel_addresses

        # The screenshot shows the rendered page: background, title colour, the 64×64 image.
        data = shot.read_bytes()
        assert png_size(data) == (800, 600)
        colours = Counter(p for row in png_pixels(data, max_rows=200) for p in row)
        assert colours.most_common(1)[0][0] == BACKGROUND
        assert colours[GREEN] == 64 * 64
        assert colours[TITLE] > 100

        # mitmproxy sent it through the tunnel; nothing went out directly.
        text = proxy.text()
        assert f"{ORIGIN_NAME}:443 through tunnel {TUNNEL!r}" in text
        assert "DIRECT" not in text


# -- run_chromium itself, with a stand-in binary (no namespace, no browser) --------------------

FAKE_CHROMIUM = """#!/bin/sh
# attempt 1: what Chromium does when an address changes mid-load (exit 0, no DOM)
# attempt 2: a page
if [ ! -e attempt1 ]; then
  : > attempt1
  echo "[1:2:ERROR:headless_shell.cc] Page load failed: net::ERR_NETWORK_CHANGED" >&2
  exit 0
fi
echo "first line of noise" >&2
echo "second attempt stderr" >&2
echo "<html><body>loaded</body></html>"
"""


class _HostNamespace:
    """Just enough of harness.Netns for run_chromium: runs in the host, counts settles."""

    name = "host"

    def __init__(self) -> None:
        self.settles = 0

    def settle(self) -> None:
        self.settles += 1

    def exec(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        kw.pop("check", None)
        return subprocess.run(argv, capture_output=True, text=True, check=False, **kw)


@pytest.fixture
def fake_chromium(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    binary = tmp_path / "fake-chromium"
    binary.write_text(FAKE_CHROMIUM)
    binary.chmod(0o755)
    monkeypatch.setattr(e2e_helpers, "chromium_binary", lambda: str(binary))
    return binary


def test_run_chromium_retries_once_on_network_changed(
    fake_chromium: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ns = _HostNamespace()
    with caplog.at_level(logging.WARNING, logger="e2e_helpers"):
        run = run_chromium(ns, tmp_path, 8080, "spki", "--dump-dom", "https://exit.test/")
    assert ns.settles == 2  # settled before each attempt
    assert [a.returncode for a in run.attempts] == [0, 0]
    assert run.stdout == "<html><body>loaded</body></html>\n"
    assert "second attempt stderr" in run.stderr
    assert (tmp_path / "chromium-profile").is_dir() and (tmp_path / "chromium-profile-2").is_dir()
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "ERR_NETWORK_CHANGED" in warning.getMessage()
    assert "running it once more" in warning.getMessage()
    # both attempts' stderr tails are in the explanation
    text = run.explain()
    assert "attempt 1/2: exit 0, 0 characters on stdout" in text
    assert "Page load failed: net::ERR_NETWORK_CHANGED" in text
    assert "attempt 2/2: exit 0" in text and "second attempt stderr" in text


def test_run_chromium_failure_messages_carry_stderr(fake_chromium: Path, tmp_path: Path) -> None:
    # only one retry: a second ERR_NETWORK_CHANGED is the result, and its stderr is reported
    fake_chromium.write_text(
        "#!/bin/sh\necho 'Page load failed: net::ERR_NETWORK_CHANGED' >&2\nexit 0\n"
    )
    run = run_chromium(_HostNamespace(), tmp_path, 8080, "spki", "--dump-dom", "https://x/")
    assert len(run.attempts) == 2 and run.returncode == 0 and run.stdout == ""
    with pytest.raises(AssertionError) as failure, run.diagnose():
        assert "<pre" in run.stdout
    notes = "\n".join(getattr(failure.value, "__notes__", []))
    assert notes.count("Page load failed: net::ERR_NETWORK_CHANGED") == 2
    assert "attempt 2/2: exit 0, 0 characters on stdout" in notes


def test_run_chromium_timeout_is_reported(fake_chromium: Path, tmp_path: Path) -> None:
    fake_chromium.write_text("#!/bin/sh\necho 'starting' >&2\nexec sleep 60\n")
    run = run_chromium(_HostNamespace(), tmp_path, 8080, "spki", "https://x/", timeout=0.5)
    assert len(run.attempts) == 1 and run.returncode is None
    assert "killed after the timeout" in run.explain()
    assert "[killed: no exit within 0.5 s]" in run.explain()
