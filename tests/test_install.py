"""Installed use, as a user without a clone has it: the wheel and sdist, installed for real.

The module builds the sdist and, from it, the wheel (``python -m build``), checks what they
carry, and installs the wheel as a user would: ``python -m venv`` (with its own pip), then
``pip install <the wheel> mitmproxy==<the version this suite runs>``, pip resolving mitmproxy
and every dependency from the package index (pip's cache and configuration apply as for any
install on this machine). The venv's own ``mitmdump`` is the console script pip wrote; the
tests check that ``mitm_wg`` and ``mitmproxy`` are imported from the venv, never from the
checkout or the test venv. Then:

* ``mitm-wg --version`` and ``mitm-wg addon`` from the venv;
* ``mitmdump -s "$(mitm-wg addon)" --set wg_conf=...`` against a real wireguard-go exit
  (tests/harness), a request through it (interop);
* ``mitm-wg demo`` from the plain install, a request the instant its banner is there.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import curl, run_mitmdump, write_client_config
from mitmproxy.version import VERSION as MITMPROXY_VERSION
from test_demo import Origin, _get, start_demo

from mitm_wg import __version__

ROOT = Path(__file__).resolve().parent.parent
#: The mitmproxy this suite runs (each CI platform pins its own): the venv gets the same one.
MITMPROXY_PIN = f"mitmproxy=={importlib.metadata.version('mitmproxy')}"
#: What the sdist is built from (as a fresh clone has it; no venvs, caches or build output).
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "mitm_wg")


@dataclass
class Dists:
    wheel: Path
    sdist: Path


@dataclass
class Installed:
    venv: Path
    site: Path

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    def run(self, *argv: str, cwd: Path, **kw: Any) -> subprocess.CompletedProcess[str]:
        env = _clean_env(self.venv)
        return subprocess.run(
            list(argv), capture_output=True, text=True, timeout=120, cwd=cwd, env=env, **kw
        )


def _clean_env(venv: Path) -> dict[str, str]:
    """The environment a user's shell would have with the venv active (no test paths)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    return env


def _check(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"{result.args}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    work = tmp_path_factory.mktemp("dists")
    src = work / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    out = work / "dist"
    # The sdist, then the wheel built from the unpacked sdist (build's default): a file the
    # sdist forgets is missing from the wheel too. --no-isolation: the test venv has
    # setuptools (test extra), so no download of a build environment.
    _check(
        subprocess.run(
            [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
            capture_output=True,
            text=True,
            timeout=300,
        )
    )
    (wheel,) = out.glob("mitm_wg-*.whl")
    (sdist,) = out.glob("mitm_wg-*.tar.gz")
    return Dists(wheel, sdist)


@pytest.fixture(scope="module")
def installed(dists: Dists, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    venv = tmp_path_factory.mktemp("user") / "venv"
    _check(
        subprocess.run(
            [sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=300
        )
    )
    python = venv / "bin" / "python"
    site = Path(
        _check(
            subprocess.run(
                [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                capture_output=True,
                text=True,
            )
        ).stdout.strip()
    )
    # The venv's own pip, in the user's environment: mitmproxy pinned to the version this
    # suite runs (the CI platform's pin), everything else resolved as pip would for a user.
    # The machine's pip configuration (index, cache, constraints) applies as it does to the
    # suite's own install in scripts/setup.sh.
    started = time.monotonic()
    _check(
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", str(dists.wheel), MITMPROXY_PIN],
            capture_output=True,
            text=True,
            env=_clean_env(venv),
            cwd=venv.parent,
            timeout=900,
        )
    )
    print(f"pip install of the wheel and {MITMPROXY_PIN}: {time.monotonic() - started:.1f} s")
    return Installed(venv, site)


def test_wheel_and_sdist_carry_the_license_and_the_addon(dists: Dists) -> None:
    with zipfile.ZipFile(dists.wheel) as wheel:
        names = set(wheel.namelist())
        info = f"mitm_wg-{__version__}.dist-info"
        metadata = wheel.read(f"{info}/METADATA").decode()
        license_text = wheel.read(f"{info}/licenses/LICENSE").decode()
    assert {"mitm_wg/addon.py", "mitm_wg/mitmproxy/ready.py", "mitm_wg/py.typed"} <= names
    assert "MIT License" in license_text
    assert "License-Expression: MIT" in metadata
    assert "Requires-Dist: mitmproxy<13,>=11" in metadata
    with tarfile.open(dists.sdist) as sdist:
        members = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert {"LICENSE", "README.md", "pyproject.toml", "mitm_wg/addon.py"} <= members


def test_cli_from_the_wheel(installed: Installed, tmp_path: Path) -> None:
    where = _check(
        installed.run(
            str(installed.bin / "python"), "-c", "import mitm_wg; print(mitm_wg.__file__)",
            cwd=tmp_path,
        )
    ).stdout.strip()  # fmt: skip
    assert Path(where) == installed.site / "mitm_wg" / "__init__.py"

    version = _check(installed.run(str(installed.bin / "mitm-wg"), "--version", cwd=tmp_path))
    assert version.stdout.startswith(f"mitm-wg {__version__} (mitmproxy {MITMPROXY_VERSION}, ")

    addon = _check(installed.run(str(installed.bin / "mitm-wg"), "addon", cwd=tmp_path))
    path = Path(addon.stdout.strip())
    assert path.is_absolute() and path == installed.site / "mitm_wg" / "addon.py"
    assert path.is_file()


def test_mitmdump_with_the_installed_addon_through_wireguard_go(
    installed: Installed, exit_peer: Any, tmp_path: Path
) -> None:
    """``mitmdump -s "$(mitm-wg addon)" --set wg_conf=exit=...``, as the README says."""
    addon = Path(
        _check(installed.run(str(installed.bin / "mitm-wg"), "addon", cwd=tmp_path)).stdout.strip()
    )
    conf = write_client_config(exit_peer, tmp_path, "exit")
    with run_mitmdump(
        exit_peer.client_ns,
        tmp_path,
        "--set",
        f"wg_conf=exit={conf}",
        mitmdump=installed.bin / "mitmdump",
        addon=addon,
    ) as dump:
        # the first request at once: run_mitmdump returns at the addon's ready line
        result = curl(exit_peer.client_ns, "-x", dump.proxy, f"{exit_peer.http_url}/bytes/4096")
        assert (result.returncode, result.status, len(result.body)) == (0, 200, 4096), result
        text = dump.wait_for_log(f"{exit_peer.server_tunnel_v4}:{exit_peer.http_port} through")
        assert f"Loading script {addon}" in text
        assert "through tunnel 'exit'" in text and "DIRECT" not in text
    # the exit saw the request from our tunnel address: it went through wireguard-go
    (stats,) = exit_peer.wg_show()
    assert stats.rx_bytes > 0 and stats.latest_handshake > 0, stats


def test_demo_from_the_plain_install(installed: Installed, tmp_path: Path) -> None:
    origin = Origin()
    thread = threading.Thread(target=origin.serve_forever, daemon=True)
    thread.start()
    try:
        with start_demo(tmp_path, [str(installed.bin / "mitm-wg")]) as d:
            port = origin.server_address[1]
            status, body = _get(d.port, f"http://127.0.0.1:{port}/from/the/wheel")
            assert (status, body) == (200, b"origin saw /from/the/wheel")
            text = d.text()
            assert f"Loading script {installed.site / 'mitm_wg' / 'addon.py'}" in text, text
            d.proc.send_signal(signal.SIGTERM)
            assert d.proc.wait(60) == 0, d.text()
            assert "Traceback" not in d.text()
    finally:
        origin.shutdown()
        origin.server_close()


def test_imports_come_from_the_venv(installed: Installed, tmp_path: Path) -> None:
    """mitm_wg and mitmproxy are the venv's own copies: not the checkout, not the test venv;
    ``mitmdump`` is the console script pip wrote for the venv's mitmproxy."""
    code = (
        "import importlib.util, json; "
        "print(json.dumps([importlib.util.find_spec(n).origin for n in ('mitm_wg', 'mitmproxy')]))"
    )
    out = _check(installed.run(str(installed.bin / "python"), "-c", code, cwd=tmp_path)).stdout
    mitm_wg, mitmproxy = json.loads(out)
    assert mitm_wg.startswith(str(installed.site)), mitm_wg
    assert not mitm_wg.startswith(str(ROOT)), mitm_wg
    assert mitmproxy.startswith(str(installed.site)), mitmproxy
    shebang = (installed.bin / "mitmdump").read_text().splitlines()[0]
    assert shebang == f"#!{installed.bin / 'python'}", shebang
