# Shared set-up steps for scripts/test and scripts/demo (sourced, not run).

setup_venv() {
    local py=${PYTHON:-python3}
    if [ ! -x .venv/bin/python ]; then
        "$py" -m venv .venv
    fi
    # Reinstall only when pyproject.toml changed since the last install.
    local stamp=.venv/.mitm-wg-installed
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        .venv/bin/python -m pip install --quiet --upgrade pip
        .venv/bin/python -m pip install --quiet -e '.[test]'
        touch "$stamp"
    fi
}

# The interop tests need wireguard-go, wg, dnsmasq, curl, iproute2 and (end-to-end) chromium. Installing needs root;
# without root the interop tests skip (and fail under CI=true).
setup_system_packages() {
    local need=()
    command -v wireguard-go >/dev/null || need+=(wireguard-go)
    command -v wg >/dev/null || need+=(wireguard-tools)
    command -v dnsmasq >/dev/null || need+=(dnsmasq-base)
    command -v curl >/dev/null || need+=(curl)
    command -v ip >/dev/null || need+=(iproute2)
    command -v chromium >/dev/null || need+=(chromium)
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
