"""The mitmproxy edge: upstream connections of mitmproxy through WireGuard tunnels.

``addons/mitm_wg.py`` is the entry script; :mod:`.addon` holds the addon, :mod:`.bridge` the
asyncio⇄trio bridge, :mod:`.transport` the asyncio transport over a trio stream and
:mod:`.patch` the reversible hook into mitmproxy's ``ConnectionHandler.open_connection``.
"""
