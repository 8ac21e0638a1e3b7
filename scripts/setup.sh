#!/usr/bin/env bash
# Sets up everything Egress Warden needs on a Debian-family host, as root.
# Idempotent: a second run changes nothing and says so.
#   - Debian packages: bcc (python3-bpfcc), kernel headers, iproute2 (test namespaces)
#   - kernel headers: the running kernel's own if the distribution has them,
#     otherwise the distribution's generic headers linked in (see DEVELOPERS.md)
#   - bpffs and tracefs mounted
#   - .venv built from /usr/bin/python3 (the interpreter bcc is built for),
#     seeing bcc through one deliberate .pth file and nothing else of Debian's
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
say() { printf 'setup: %s\n' "$*"; }

[ "$(id -u)" = 0 ] || { echo "setup: run as root (it installs packages and mounts bpffs)" >&2; exit 1; }

# postgresql: the collector tests start their own throwaway server from its binaries
debian_packages=(python3-bpfcc python3-venv iproute2 util-linux postgresql)
missing=()
for p in "${debian_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  say "Debian packages present"
fi

# Kernel headers: bcc compiles against /lib/modules/$(uname -r)/build.
kver=$(uname -r)
build=/lib/modules/$kver/build
if [ -e "$build/include" ]; then
  say "kernel headers for $kver found at $build"
elif apt-get install -y -q --no-install-recommends "linux-headers-$kver" >/dev/null 2>&1; then
  say "installed linux-headers-$kver"
else
  # No headers package for this kernel (custom or cloud kernel). Our BPF programs
  # read only uapi structs, so the distribution's generic headers are safe to use.
  arch=$(dpkg --print-architecture)
  if ! ls -d /usr/src/linux-headers-*-"$arch" >/dev/null 2>&1; then
    say "no headers package for $kver: installing linux-headers-$arch instead"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "linux-headers-$arch"
  fi
  arch_dir=$(ls -d /usr/src/linux-headers-*-"$arch" | sort -V | tail -n 1)
  common_dir=$(ls -d /usr/src/linux-headers-*-common | sort -V | tail -n 1)
  mkdir -p "/lib/modules/$kver"
  ln -sfn "$arch_dir" "/lib/modules/$kver/build"
  ln -sfn "$common_dir" "/lib/modules/$kver/source"
  say "kernel $kver has no headers package: linked build -> $arch_dir, source -> $common_dir"
fi

mountpoint -q /sys/fs/bpf || { mount -t bpf bpf /sys/fs/bpf; say "mounted bpffs on /sys/fs/bpf"; }
if [ ! -e /sys/kernel/tracing/events ]; then
  mount -t tracefs tracefs /sys/kernel/tracing; say "mounted tracefs on /sys/kernel/tracing"
fi

venv=$here/.venv
if [ ! -x "$venv/bin/python" ]; then
  /usr/bin/python3 -m venv "$venv"
  say "created $venv from /usr/bin/python3"
fi
# bcc ships only as Debian's python3-bpfcc, built for /usr/bin/python3. Expose that
# one package to the venv through a directory holding just a link to it, so no other
# Debian module shadows what pip installed.
bcc_src=$(/usr/bin/python3 -c 'import bcc, os; print(os.path.dirname(bcc.__file__))')
mkdir -p "$venv/debian-bcc"
ln -sfn "$bcc_src" "$venv/debian-bcc/bcc"
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$venv/debian-bcc" > "$site/debian-bcc.pth"

stamp=$venv/.installed-from
want=$(cat "$here/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing Python packages into $venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -e "$here[test,codegen]"
  echo "$want" > "$stamp"
else
  say "Python packages up to date"
fi
"$venv/bin/python" "$here/scripts/gen_proto.py"
"$venv/bin/python" -c 'import bcc, grpc, psutil, pyroute2, click, yaml, agent.api.gen.egress_warden.v1.agent_pb2_grpc' \
  || { echo "setup: the venv cannot import its packages" >&2; exit 1; }
say "ready: $venv/bin/warden"
