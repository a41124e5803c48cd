"""Installed use, as a user without a clone has it: the wheel and sdist, installed for real.

The module builds the sdist and, from it, the wheel (``python -m build``), checks what they
carry, and installs the wheel with pip into a fresh venv. To keep the suite fast and offline,
the new venv gets mitm-wg's dependencies (mitmproxy included) through a ``.pth`` line naming
the test venv's site-packages (a plain path: the test venv's editable mitm-wg is *not*
importable from there), and a ``mitmdump`` launcher like the one pip writes for mitmproxy's
entry point; the tests check that ``mitm_wg`` is imported from the wheel's copy. Then:

* ``mitm-wg --version`` and ``mitm-wg addon`` from the venv;
* ``mitmdump -s "$(mitm-wg addon)" --set wg_conf=...`` against a real wireguard-go exit
  (tests/harness), a request through it (interop);
* ``mitm-wg demo`` from the plain install, a request the instant its banner is there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import require_mitmdump
from e2e_helpers import curl, run_mitmdump, write_client_config
from mitmproxy.version import VERSION as MITMPROXY_VERSION
from test_demo import Origin, _get, start_demo

from mitm_wg import __version__

ROOT = Path(__file__).resolve().parent.parent
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
    require_mitmdump()
    venv = tmp_path_factory.mktemp("user") / "venv"
    _check(
        subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", str(venv)],
            capture_output=True,
            text=True,
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
    deps = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (site / "_mitm_wg_test_dependencies.pth").write_text("".join(f"{p}\n" for p in sorted(deps)))
    # The test venv's pip installs into the new venv (--python). --ignore-installed: it sees
    # the test venv's packages through the .pth and must neither skip mitm-wg as "already
    # satisfied" nor uninstall anything there.
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet"]
    _check(
        subprocess.run(
            [*pip, "--no-deps", "--ignore-installed", "--no-index", str(dists.wheel)],
            capture_output=True,
            text=True,
            env=_clean_env(venv),
            timeout=300,
        )
    )
    launcher = venv / "bin" / "mitmdump"  # what pip writes for mitmproxy's console script
    launcher.write_text(
        f"#!{python}\nimport sys\nfrom mitmproxy.tools.main import mitmdump\nsys.exit(mitmdump())\n"
    )
    launcher.chmod(0o755)
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


def test_dependency_pth_does_not_expose_the_checkout(installed: Installed, tmp_path: Path) -> None:
    """The .pth shortcut gives the dependencies only: the editable checkout stays invisible."""
    code = (
        "import importlib.util, json; "
        "print(json.dumps([importlib.util.find_spec(n).origin for n in ('mitm_wg', 'mitmproxy')]))"
    )
    out = _check(installed.run(str(installed.bin / "python"), "-c", code, cwd=tmp_path)).stdout
    mitm_wg, mitmproxy = json.loads(out)
    assert mitm_wg.startswith(str(installed.site)), mitm_wg
    assert not mitm_wg.startswith(str(ROOT)), mitm_wg
    assert mitmproxy is not None
