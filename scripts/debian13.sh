# A Debian 13 root with Python 3.13 for the second CI platform (sourced, not run).
#
# debian13_root      builds the root once (mmdebstrap) and caches it under
#                    ~/.cache/mitm-wg/debian13-<hash of the recipe>; prints its path.
# debian13_run CMD   runs CMD (a bash command line) inside the root, in this checkout (bind-mounted
#                    at the same path), in a private mount namespace: every mount made for it
#                    (proc, dev, sys, a fresh /run, the checkout) disappears when CMD ends, even
#                    if it crashes. Network namespaces belong to the kernel, so the harness
#                    works there as on the host; the root's /run (namespace names,
#                    /var/run/wireguard sockets, the harness's owner records) is its own tmpfs,
#                    so its names never meet the host's in one directory.

DEBIAN13_SUITE=trixie
# Everything the suite needs inside the root (apt's no-recommends, as scripts/setup.sh).
DEBIAN13_PACKAGES="python3,python3-venv,ca-certificates,wireguard-go,wireguard-tools,dnsmasq-base,curl,iproute2,chromium,fonts-dejavu-core,procps,nginx,nftables"

debian13_root() {
    local recipe hash cache dir tmp
    recipe="$DEBIAN13_SUITE $DEBIAN13_PACKAGES recipe-v1"
    hash=$(printf '%s' "$recipe" | sha256sum | cut -c1-12)
    cache="${XDG_CACHE_HOME:-$HOME/.cache}/mitm-wg"
    dir="$cache/debian13-$hash"
    mkdir -p "$cache"
    (
        flock 9  # one build at a time; later runs find it done
        if [ ! -f "$dir/.mitm-wg-complete" ]; then
            if [ "$(id -u)" -ne 0 ]; then
                echo "building the Debian 13 root needs root" >&2
                exit 1
            fi
            command -v mmdebstrap >/dev/null || {
                echo "installing mmdebstrap" >&2
                apt-get update -qq >/dev/null
                DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                    mmdebstrap >/dev/null
            }
            echo "building the Debian 13 root in $dir (once; a few minutes)" >&2
            tmp="$dir.tmp.$$"
            rm -rf "$tmp"
            mmdebstrap --quiet --variant=apt \
                --aptopt='APT::Install-Recommends "false"' \
                --include="$DEBIAN13_PACKAGES" "$DEBIAN13_SUITE" "$tmp" >&2
            touch "$tmp/.mitm-wg-complete"
            rm -rf "$dir"
            mv "$tmp" "$dir"
        fi
    ) 9>"$cache/debian13.lock" || return 1
    printf '%s\n' "$dir"
}

debian13_run() {
    local root=$1 command=$2 here
    here=$(pwd -P)
    # The host's CA bundle, DNS and pip settings (without a constraint line: the host's pip
    # constraints name files that exist only on the host).
    # (Each written beside and renamed: a concurrent run never reads half a file.)
    _debian13_put() { install -m 644 "$1" "$2.$$" && mv -f "$2.$$" "$2"; }
    _debian13_put /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
    _debian13_put /etc/resolv.conf "$root/etc/resolv.conf"
    if [ -f /etc/pip.conf ]; then
        grep -v -i '^[[:space:]]*constraint' /etc/pip.conf >"$root/etc/pip.conf.$$" || true
        mv -f "$root/etc/pip.conf.$$" "$root/etc/pip.conf"
    fi
    mkdir -p "$root$here"
    unshare --mount --propagation private -- env ROOT="$root" HERE="$here" CMD="$command" \
        bash -euc '
        # The root must be a mount point: "ip netns exec" and "ip -n" make / a slave mount.
        mount --bind "$ROOT" "$ROOT"
        mount -t proc proc "$ROOT/proc"
        mount --rbind /dev "$ROOT/dev"
        mount --rbind /sys "$ROOT/sys"
        mount -t tmpfs -o mode=755 tmpfs "$ROOT/run"
        mount --bind "$HERE" "$ROOT$HERE"
        exec chroot "$ROOT" /usr/bin/env -u PIP_FIND_LINKS -u VIRTUAL_ENV \
            PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            HOME=/root LANG=C.UTF-8 \
            bash -euc "cd \"\$1\" && $CMD" mitm-wg-debian13 "$HERE"
    '
}
