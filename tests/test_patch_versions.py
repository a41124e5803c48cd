"""Which mitmproxy versions the patch accepts (mitm_wg/mitmproxy/patch.py).

CI runs this file on both platforms (mitmproxy 11.0.x and 12.3.x), so the first test proves
that both are tested versions with the known code. An untested major version is accepted
only with the tested code, and refused at load otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import mitmproxy_rs
import pytest
from mitmproxy.proxy import server as mitmproxy_server
from mitmproxy.version import VERSION

from mitm_wg.addon import PATH as ADDON
from mitm_wg.mitmproxy import patch

MITMDUMP = Path(sys.executable).parent / "mitmdump"


def test_the_installed_mitmproxy_is_tested_and_its_code_is_the_known_code() -> None:
    assert {"11", "12"} <= set(patch.TESTED_MITMPROXY)
    assert VERSION.split(".")[0] in patch.TESTED_MITMPROXY
    func = mitmproxy_server.ConnectionHandler.open_connection
    assert patch.fingerprint(func) in patch.KNOWN_FINGERPRINTS


async def _changed(self: Any, command: Any) -> None:
    """Still one TCP and one UDP call (the structural checks pass), but different code."""
    print("a new step before connecting", command)
    await asyncio.open_connection("a", 1)
    await mitmproxy_rs.udp.open_udp_connection("c", 3)


def test_fingerprint_ignores_line_numbers_but_not_what_the_code_uses() -> None:
    namespace: dict[str, Any] = {}
    source = "async def f(self, command):\n    await asyncio.open_connection(1, 2)\n"
    exec(compile(source, "a", "exec"), {"asyncio": asyncio}, namespace)
    first = namespace["f"]
    exec(compile("\n\n\n" + source, "b", "exec"), {"asyncio": asyncio}, namespace)
    assert patch.fingerprint(namespace["f"]) == patch.fingerprint(first)
    assert patch.fingerprint(_changed) != patch.fingerprint(first)


def test_untested_major_with_the_tested_code_is_accepted_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(patch, "MITMPROXY_VERSION", "13.0.0")
    with caplog.at_level(logging.WARNING, logger=patch.__name__):
        patch.check_compatible(mitmproxy_server.ConnectionHandler.open_connection)
    assert "tested with mitmproxy 11.x and 12.x, this is 13.0.0" in caplog.text
    assert "unchanged" in caplog.text


def test_untested_major_with_changed_code_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(patch, "MITMPROXY_VERSION", "13.0.0")
    with pytest.raises(patch.PatchError) as caught:
        patch.check_compatible(_changed)
    message = str(caught.value)
    assert "supports mitmproxy 11.x and 12.x; this is mitmproxy 13.0.0" in message
    assert "differs from the tested code" in message
    assert "Refusing to load" in message


def test_tested_major_with_changed_code_still_loads_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(patch, "MITMPROXY_VERSION", "12.9.0")
    with caplog.at_level(logging.WARNING, logger=patch.__name__):
        patch.check_compatible(_changed)
    assert "differs from the code mitm-wg was tested with" in caplog.text


# A script loaded before the addon that makes this mitmproxy look like a future major release
# whose open_connection changed.
_PRETEND_13 = """
import asyncio
import mitmproxy.version
import mitmproxy_rs
from mitmproxy.proxy import server

mitmproxy.version.VERSION = "13.0.0"


async def open_connection(self, command):
    print("a new step before connecting", command)
    await asyncio.open_connection("a", 1)
    await mitmproxy_rs.udp.open_udp_connection("c", 3)


server.ConnectionHandler.open_connection = open_connection
"""


def test_mitmdump_refuses_the_addon_at_load_on_a_changed_untested_release(
    tmp_path: Path,
) -> None:
    pretend = tmp_path / "pretend_13.py"
    pretend.write_text(textwrap.dedent(_PRETEND_13))
    argv = [
        str(MITMDUMP),
        "--listen-host", "127.0.0.1",
        "--listen-port", "0",
        "--set", f"confdir={tmp_path / 'conf'}",
        "-s", str(pretend),
        "-s", str(ADDON),
    ]  # fmt: skip
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, cwd=tmp_path, stdin=subprocess.DEVNULL
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "this is mitmproxy 13.0.0" in output, output
    assert "Refusing to load" in output, output
    assert "Error logged during startup" in output, output
    assert "mitm-wg: ready" not in output, output
