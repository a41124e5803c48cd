# Shared set-up steps for scripts/test and scripts/demo (sourced, not run).

# The venv directory: MITM_WG_VENV (default .venv; the Debian 13 run uses .venv-debian13).
# MITM_WG_MITMPROXY: a pip requirement pinning mitmproxy (e.g. "mitmproxy~=12.3.0"), as CI does.
VENV=${MITM_WG_VENV:-.venv}

setup_venv() {
    local py=${PYTHON:-python3}
    if [ ! -x "$VENV/bin/python" ]; then
        "$py" -m venv "$VENV"
    fi
    # Reinstall only when pyproject.toml or the mitmproxy pin changed since the last install.
    local stamp="$VENV/.mitm-wg-installed" want="${MITM_WG_MITMPROXY:-}"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        "$VENV/bin/python" -m pip install --quiet --upgrade pip
        # shellcheck disable=SC2086  # the pin is one word or none
        "$VENV/bin/python" -m pip install --quiet -e '.[test]' $want
        printf '%s' "$want" >"$stamp"
    fi
}

# The interop tests need wireguard-go, wg, dnsmasq, curl, iproute2, nftables, (end-to-end)
# chromium and (benchmark smoke tests) nginx. Installing needs root;
# without root the interop tests skip (and fail under CI=true).
setup_system_packages() {
    local need=()
    command -v wireguard-go >/dev/null || need+=(wireguard-go)
    command -v wg >/dev/null || need+=(wireguard-tools)
    command -v dnsmasq >/dev/null || need+=(dnsmasq-base)
    command -v curl >/dev/null || need+=(curl)
    command -v ip >/dev/null || need+=(iproute2)
    command -v chromium >/dev/null || need+=(chromium)
    # nginx: the native-speed origin of bench_path.py and bench_mitm_https.py (smoke-tested)
    command -v nginx >/dev/null || need+=(nginx)
    # nft: a black hole beyond the exit (tests/test_narrow_path.py: a silent drop on the
    # exit's forwarding path)
    command -v nft >/dev/null || need+=(nftables)
    [ ${#need[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "not root: skipping apt-get install ${need[*]} (interop tests will skip)" >&2
        return 0
    fi
    echo "installing ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    # --no-install-recommends: otherwise wireguard-tools drags in a kernel image.
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    # fonts let headless Chromium render pages for screenshots
    apt-get install -y -qq --no-install-recommends fonts-dejavu-core >/dev/null || true
}
