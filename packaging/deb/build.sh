#!/usr/bin/env bash
# Builds the Debian package of splicegate from this workspace, with
# dpkg-deb (no debhelper tree needed):
#
#   packaging/deb/build.sh [--binary PATH] [--out DIR]
#
# Without --binary it builds `cargo build --release -p splicegate` first.
# The package holds: /usr/bin/splicegate (the eBPF object is compiled into
# it), /etc/splicegate/splicegate.toml (a conffile that serves nothing until
# edited), /lib/systemd/system/splicegate.service, the agent's unit
# splicegate-agent.service and its /etc/splicegate/agent.env (a conffile), the man page and shell
# completions generated from the CLI, and the licence, changelog and docs
# under /usr/share/doc/splicegate. Its maintainer scripts create the system
# user `splicegate` and /var/lib/splicegate. Prints the .deb's path.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
BIN=""
OUT="$ROOT/target/deb"
while [ $# -gt 0 ]; do
    case "$1" in
    --binary) BIN="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "usage: $0 [--binary PATH] [--out DIR]" >&2; exit 2 ;;
    esac
done
if [ -z "$BIN" ]; then
    (cd "$ROOT" && cargo build --release --locked -p splicegate >&2)
    BIN="$ROOT/target/release/splicegate"
fi
[ -x "$BIN" ] || { echo "no binary at $BIN" >&2; exit 2; }

# The upstream version with a Debian revision (-1): not a native package.
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/Cargo.toml" | head -1)-1"
ARCH="$(dpkg --print-architecture)"
COMMIT="$("$BIN" --version | sed -n 's/.*(commit \(.*\))/\1/p')"
STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
PKG="$STAGE/splicegate"

install -d "$PKG/DEBIAN" "$PKG/usr/bin" "$PKG/etc/splicegate" "$PKG/lib/systemd/system" \
    "$PKG/usr/share/man/man1" "$PKG/usr/share/doc/splicegate" \
    "$PKG/usr/share/bash-completion/completions" "$PKG/usr/share/zsh/vendor-completions" \
    "$PKG/usr/share/fish/vendor_completions.d" "$PKG/usr/share/lintian/overrides"
install -m 0755 "$BIN" "$PKG/usr/bin/splicegate"
# Symbols and debug sections stay out of the package (Debian policy 10.1).
strip --strip-unneeded --remove-section=.comment --remove-section=.note "$PKG/usr/bin/splicegate"
# 0644 in the package; postinst makes it root:splicegate 0640 (it may hold
# package keys and the admin token).
install -m 0644 "$ROOT/packaging/splicegate.toml" "$PKG/etc/splicegate/splicegate.toml"
install -m 0644 "$ROOT/packaging/splicegate.service" "$PKG/lib/systemd/system/splicegate.service"
install -m 0644 "$ROOT/packaging/splicegate-agent.service" "$PKG/lib/systemd/system/splicegate-agent.service"
# 0644 in the package; postinst makes it 0600 (it holds the device key).
install -m 0644 "$ROOT/packaging/agent.env" "$PKG/etc/splicegate/agent.env"
"$BIN" man | gzip -9n >"$PKG/usr/share/man/man1/splicegate.1.gz"
"$BIN" completions bash >"$PKG/usr/share/bash-completion/completions/splicegate"
"$BIN" completions zsh >"$PKG/usr/share/zsh/vendor-completions/_splicegate"
"$BIN" completions fish >"$PKG/usr/share/fish/vendor_completions.d/splicegate.fish"
chmod 0644 "$PKG"/usr/share/*/completions/splicegate "$PKG/usr/share/zsh/vendor-completions/_splicegate" \
    "$PKG/usr/share/fish/vendor_completions.d/splicegate.fish"

DOC="$PKG/usr/share/doc/splicegate"
cat >"$DOC/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: splicegate
Source: https://github.com/splicegate/splicegate

Files: *
Copyright: 2025-2026 The splicegate authors
License: Apache-2.0
 On Debian systems, the full text of the Apache License, Version 2.0 can be
 found in /usr/share/common-licenses/Apache-2.0.
COPYRIGHT
{
    echo "splicegate ($VERSION) unstable; urgency=medium"
    echo
    echo "  * Built from commit $COMMIT."
    echo
    echo " -- splicegate maintainers <maintainers@splicegate.invalid>  $(date -R -u -d "@${SOURCE_DATE_EPOCH:-$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || date +%s)}")"
} | gzip -9n >"$DOC/changelog.Debian.gz"
for f in README.md docs/configuration.md docs/errors.md docs/admin-api.md docs/connection-string.md docs/tuning.md docs/agents.md; do
    [ -f "$ROOT/$f" ] && install -m 0644 "$ROOT/$f" "$DOC/$(basename "$f")"
done

install -m 0644 "$ROOT/packaging/deb/lintian/splicegate" "$PKG/usr/share/lintian/overrides/splicegate"

printf '%s\n' /etc/splicegate/splicegate.toml /etc/splicegate/agent.env >"$PKG/DEBIAN/conffiles"
install -m 0755 "$ROOT/packaging/deb/postinst" "$PKG/DEBIAN/postinst"
install -m 0755 "$ROOT/packaging/deb/postrm" "$PKG/DEBIAN/postrm"
SIZE="$(du -sk --exclude=DEBIAN "$PKG" | cut -f1)"
cat >"$PKG/DEBIAN/control" <<CONTROL
Package: splicegate
Version: $VERSION
Architecture: $ARCH
Maintainer: splicegate maintainers <maintainers@splicegate.invalid>
Installed-Size: $SIZE
Depends: libc6 (>= 2.34), libgcc-s1, adduser
Section: net
Priority: optional
Homepage: https://github.com/splicegate/splicegate
Description: residential-proxy gateway with io_uring splice relays
 splicegate is a "super proxy": clients speak HTTP CONNECT, HTTP forwarding
 or SOCKS5 (in the clear or inside TLS) on one port, say in the proxy
 username which exit they want, and the gateway picks an exit node (an
 upstream HTTP or SOCKS5 proxy, or a local address) and relays the bytes
 with splice(2) on thread-per-core io_uring workers. Packages, limits,
 traffic caps, credits and the commercial networks' error codes included;
 optional eBPF programs drop floods before a socket exists.
CONTROL
mkdir -p "$OUT"
DEB="$OUT/splicegate_${VERSION}_${ARCH}.deb"
dpkg-deb --root-owner-group -Zxz --build "$PKG" "$DEB" >&2
echo "$DEB"
