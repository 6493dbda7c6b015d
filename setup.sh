#!/bin/sh
# hypersolid setup, as root on Debian bookworm (or newer).
#
#   ./setup.sh              install host packages and Python deps, build the default target
#   ./setup.sh --no-build   install only
#   ./setup.sh --test [ARGS]  install, then run the test suite (pytest ARGS)
#
# Python packages go into ./.venv; activate it (. .venv/bin/activate) to type `doit`.
set -eu
cd "$(dirname "$0")"

APT_PACKAGES="multistrap apt-utils squashfs-tools systemd-container binfmt-support qemu-user-static
cpio util-linux fdisk e2fsprogs qemu-system-x86 qemu-system-arm python3 python3-venv
dosfstools mtools bmap-tools zstd ovmf qemu-efi-aarch64 attr acl libcap2-bin"

if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: run as root: builds run containers, mount overlays and install host packages" >&2
    exit 1
fi

missing=""
for p in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "setup.sh: installing host packages:$missing"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

case "${1:-}" in
    --no-build) echo "setup.sh: installed; now: . .venv/bin/activate && doit" ;;
    --test) shift; exec .venv/bin/python -m pytest "$@" ;;
    "") exec .venv/bin/doit ;;
    *) echo "setup.sh: unknown option $1 (see the top of this file)" >&2; exit 2 ;;
esac
