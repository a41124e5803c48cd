"""The tunnel's UDP socket buffers against the kernel's limit (net.core.rmem_max).

An unprivileged process gets at most ``net.core.rmem_max`` for ``SO_RCVBUF``: 208 KiB on a
stock Linux kernel, where a fast download then loses datagrams in bursts (bench_path
``--udp-buffer 212992``). The tunnel asks for ``UDP_BUFFER_BYTES`` and says once per process,
with the sysctl to raise, when the kernel gave less. The kernel here is real: these tests ask
for more and for less than this machine's limit.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from mitm_wg.runtime import tunnel as tunnel_module

RMEM_MAX = int(Path("/proc/sys/net/core/rmem_max").read_text())


def _said(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "UDP socket" in r.getMessage()
    ]


def _open_and_grow(count: int) -> list[int]:
    """``count`` UDP sockets through the tunnel's buffer setup; their SO_RCVBUF."""
    sizes = []
    for _ in range(count):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            tunnel_module._grow_buffers(sock)
            sizes.append(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
    return sizes


def test_a_receive_buffer_below_the_ask_is_said_once_with_the_sysctl(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ask = 4 * RMEM_MAX  # (SO_RCVBUF is capped at rmem_max even for root; FORCE is not used)
    monkeypatch.setattr(tunnel_module, "UDP_BUFFER_BYTES", ask)
    monkeypatch.setattr(tunnel_module, "_small_buffer_said", False)
    with caplog.at_level(logging.WARNING, logger=tunnel_module.logger.name):
        sizes = _open_and_grow(3)
    assert all(size < ask for size in sizes), sizes  # the kernel's cap held
    said = _said(caplog)
    assert len(said) == 1, said  # once per process, not per socket or tunnel
    assert f"{sizes[0] >> 10} KiB receive buffer" in said[0], said
    assert f"the {ask >> 10} KiB asked for" in said[0], said
    assert f"sysctl -w net.core.rmem_max={ask}" in said[0], said


def test_nothing_is_said_when_the_kernel_grants_the_ask(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ask = RMEM_MAX // 2
    monkeypatch.setattr(tunnel_module, "UDP_BUFFER_BYTES", ask)
    monkeypatch.setattr(tunnel_module, "_small_buffer_said", False)
    with caplog.at_level(logging.WARNING, logger=tunnel_module.logger.name):
        sizes = _open_and_grow(1)
    assert sizes[0] >= ask, sizes
    assert _said(caplog) == []
