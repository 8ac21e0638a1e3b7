#!/usr/bin/env bash
# Sets up everything Egress Warden needs on a Debian-family host, as root.
# Idempotent: a second run changes nothing and says so.
#   - Debian packages: bcc (python3-bpfcc), kernel headers, iproute2 (test namespaces),
#     vagrant (the tests validate vagrant/Vagrantfile), dnsmasq-base (the DNS server
#     tests run in their namespaces; not `dnsmasq`, which starts a service), postgresql
#     (the collector tests start their own throwaway server from its binaries), iperf3
#     (bench/traffic.py's bulk transfers)
#   - kernel headers: the running kernel's own if the distribution has them,
#     otherwise the distribution's generic headers linked in (see DEVELOPERS.md)
#   - bpffs and tracefs mounted
#   - .venv built from /usr/bin/python3 (the interpreter bcc is built for),
#     seeing bcc through one deliberate .pth file and nothing else of Debian's
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/scripts/lib/host.sh"
require_root "it installs packages and mounts bpffs"

debian_packages=(python3-bpfcc python3-venv iproute2 util-linux vagrant dnsmasq-base postgresql iperf3)
ensure_debian_packages "${debian_packages[@]}"
ensure_kernel_headers
ensure_bpf_mounts
ensure_venv "$here/.venv" "$here[test,codegen]" "$here/pyproject.toml"
generate_stubs "$here/.venv" "$here"
check_venv "$here/.venv"
say "ready: $here/.venv/bin/warden"
