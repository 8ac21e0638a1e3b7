# Host preparation shared by scripts/setup.sh (development, tests) and
# scripts/install.sh (production install). Source it; every function is idempotent
# and says what it did through `say`.

say() { printf '%s: %s\n' "${SAY_PREFIX:-setup}" "$*"; }

require_root() {
  [ "$(id -u)" = 0 ] || { echo "${SAY_PREFIX:-setup}: run as root ($1)" >&2; exit 1; }
}

# ensure_debian_packages PKG...: installs those not installed yet.
ensure_debian_packages() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  else
    say "Debian packages present"
  fi
}

# Kernel headers: bcc compiles against /lib/modules/$(uname -r)/build.
ensure_kernel_headers() {
  local kver build arch arch_dir common_dir
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
}

ensure_bpf_mounts() {
  mountpoint -q /sys/fs/bpf || { mount -t bpf bpf /sys/fs/bpf; say "mounted bpffs on /sys/fs/bpf"; }
  if [ ! -e /sys/kernel/tracing/events ]; then
    mount -t tracefs tracefs /sys/kernel/tracing; say "mounted tracefs on /sys/kernel/tracing"
  fi
}

# ensure_venv VENV PIP_TARGET STAMP_INPUT...: a venv built from /usr/bin/python3 (the
# interpreter bcc is built for) that sees bcc and nothing else of Debian's, with
# PIP_TARGET installed; reinstalled only when the files STAMP_INPUT... changed.
ensure_venv() {
  local venv=$1 target=$2 bcc_src site stamp want
  shift 2
  if [ ! -x "$venv/bin/python" ]; then
    /usr/bin/python3 -m venv "$venv"
    say "created $venv from /usr/bin/python3"
  fi
  # bcc ships only as Debian's python3-bpfcc, built for /usr/bin/python3. Expose that
  # one package to the venv through a directory holding just a link to it, so no other
  # Debian module shadows what pip installed.
  bcc_src=$(/usr/bin/python3 -c 'import bcc, os; print(os.path.dirname(bcc.__file__))')
  mkdir -p "$venv/debian-bcc"
  [ "$(readlink "$venv/debian-bcc/bcc")" = "$bcc_src" ] || ln -sfn "$bcc_src" "$venv/debian-bcc/bcc"
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  [ "$(cat "$site/debian-bcc.pth" 2>/dev/null)" = "$venv/debian-bcc" ] || echo "$venv/debian-bcc" > "$site/debian-bcc.pth"

  stamp=$venv/.installed-from
  want=$(cat "$@" | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "installing Python packages into $venv"
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q -e "$target"
    echo "$want" > "$stamp"
  else
    say "Python packages up to date"
  fi
}

# generate_stubs VENV APP: the gRPC stubs from APP/proto (only when a .proto changed).
generate_stubs() {
  "$1/bin/python" "$2/scripts/gen_proto.py" | while read -r line; do say "$line"; done
}

check_venv() {
  "$1/bin/python" -c 'import bcc, grpc, psutil, pyroute2, click, yaml, agent.api.gen.egress_warden.v1.agent_pb2_grpc' \
    || { echo "${SAY_PREFIX:-setup}: $1 cannot import its packages" >&2; exit 1; }
}
