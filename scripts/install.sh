#!/usr/bin/env bash
# Installs Egress Warden on an inference host (as root), or removes it.
#
#   scripts/install.sh                      install or upgrade on this host
#   scripts/install.sh --root DIR           install into another root (an image, a test)
#   scripts/install.sh --uninstall [--purge] remove what it installed, detach the programs
#                                           and free their pinned maps; --purge also
#                                           removes state and logs
#
# What it installs (all under --root, default /):
#   /opt/egress-warden/app     the agent's code (agent/, bpf/, proto/)
#   /opt/egress-warden/venv    its own virtual environment (bcc from Debian, the rest from PyPI)
#   /etc/systemd/system/egress-warden.service, egress-warden-collector.service
#   /etc/tmpfiles.d/egress-warden.conf and the directories it names
#   /etc/egress-warden/policy.yaml   the default policy (monitor mode), only if absent
#   /usr/share/doc/egress-warden/examples/litellm.service.d/  drop-in for a router's unit
# A second run changes nothing and says so. An upgrade restarts a running agent, which
# takes over the old programs before detaching them: no enforcement gap.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
SAY_PREFIX=install
. "$here/scripts/lib/host.sh"

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

root=/
action=install
purge=0
while [ $# -gt 0 ]; do
  case $1 in
    --root) root=${2:?--root needs a directory}; shift 2 ;;
    --uninstall) action=uninstall; shift ;;
    --purge) purge=1; shift ;;
    -h|--help) usage ;;
    *) echo "install: unknown argument '$1'" >&2; usage 2 >&2 ;;
  esac
done
require_root "it installs packages, units and directories owned by root"
root=$(mkdir -p "$root" && cd "$root" && pwd)
r=${root%/}  # prefix for absolute paths; empty for /
prefix=$r/opt/egress-warden
manifest=$prefix/installed-files
changes=0

on_this_host() { [ "$root" = / ]; }
systemd_running() { on_this_host && [ -d /run/systemd/system ]; }

# put SRC DEST MODE: install a file only when its content or mode differs; uninstall
# removes what the manifest lists.
put() {
  local src=$1 dest=$r$2 mode=$3
  record "$2"
  if [ -f "$dest" ] && cmp -s "$src" "$dest" && [ "$(stat -c %a "$dest")" = "$mode" ]; then
    return
  fi
  install -D -m "$mode" -o root -g root "$src" "$dest"
  say "installed $2"
  changes=$((changes + 1))
}

record() { grep -qxF "$1" "$manifest" 2>/dev/null || echo "$1" >> "$manifest"; }

app_files() {
  local wanted=() p
  for p in agent bpf proto pyproject.toml README.md examples scripts/gen_proto.py; do
    [ -e "$here/$p" ] && wanted+=("$p")
  done
  # Generated gRPC stubs are rebuilt from proto/ in place, never copied.
  (cd "$here" && find "${wanted[@]}" -name __pycache__ -prune -o -path agent/api/gen -prune -o -type f -print | sort)
}

sync_app() {
  local want have
  want=$(cd "$here" && app_files | xargs sha256sum | sha256sum | cut -d' ' -f1)
  have=$(cat "$prefix/.app-digest" 2>/dev/null || true)
  if [ "$want" = "$have" ]; then
    return
  fi
  rm -rf "$prefix/app.new"
  mkdir -p "$prefix/app.new"
  (cd "$here" && app_files | tar -cf - -T -) | tar -xf - -C "$prefix/app.new"
  rm -rf "$prefix/app"
  mv "$prefix/app.new" "$prefix/app"
  echo "$want" > "$prefix/.app-digest"
  say "installed the agent's code in ${prefix#$r}/app"
  changes=$((changes + 1))
}

make_directories() {
  # The lines of the tmpfiles entry, applied now (systemd-tmpfiles does it at boot).
  local type path mode user group _
  while read -r type path mode user group _; do
    case $type in d) ;; *) continue ;; esac
    if [ ! -d "$r$path" ] || [ "$(stat -c '%a %U %G' "$r$path")" != "${mode#0} $user $group" ]; then
      install -d -m "$mode" -o "$user" -g "$group" "$r$path"
      say "directory $path ($mode $user:$group)"
      changes=$((changes + 1))
    fi
  done < <(grep -v '^#' "$here/systemd/egress-warden.tmpfiles")
}

install_everything() {
  if on_this_host; then
    ensure_debian_packages python3-bpfcc python3-venv iproute2 util-linux
    ensure_kernel_headers
    ensure_bpf_mounts
  else
    # The venv needs bcc and venv from this host; kernel headers and mounts are the
    # business of the system that boots from $root.
    ensure_debian_packages python3-bpfcc python3-venv
  fi
  mkdir -p "$prefix"
  sync_app
  local stamp_before
  stamp_before=$(cat "$prefix/venv/.installed-from" 2>/dev/null || true)
  ensure_venv "$prefix/venv" "$prefix/app[codegen]" "$prefix/app/pyproject.toml"
  generate_stubs "$prefix/venv" "$prefix/app"
  check_venv "$prefix/venv"
  [ "$stamp_before" = "$(cat "$prefix/venv/.installed-from")" ] || changes=$((changes + 1))

  put "$here/systemd/egress-warden.service" /etc/systemd/system/egress-warden.service 644
  put "$here/systemd/egress-warden-collector.service" /etc/systemd/system/egress-warden-collector.service 644
  put "$here/systemd/egress-warden.tmpfiles" /etc/tmpfiles.d/egress-warden.conf 644
  put "$here/systemd/examples/litellm.service.d/egress-warden.conf" \
      /usr/share/doc/egress-warden/examples/litellm.service.d/egress-warden.conf 644
  make_directories
  if [ ! -e "$r/etc/egress-warden/policy.yaml" ]; then
    put "$here/examples/policy.yaml" /etc/egress-warden/policy.yaml 600
  fi
  record /etc/egress-warden/policy.yaml  # also when it was there before: uninstall keeps it if edited

  if systemd_running; then
    systemctl daemon-reload
    if [ "$changes" -gt 0 ] && systemctl is-active -q egress-warden.service; then
      # The new agent attaches its programs before it detaches the old ones.
      systemctl restart egress-warden.service
      say "restarted egress-warden.service (took over enforcement without a gap)"
    fi
  fi
  if [ "$changes" -eq 0 ]; then
    say "already installed in $root: nothing changed"
  else
    say "installed in $root ($changes change(s))."
    say "next: edit /etc/egress-warden/policy.yaml, then: systemctl enable --now egress-warden"
  fi
}

uninstall_everything() {
  [ -d "$prefix" ] || { say "not installed in $root: nothing to remove"; return; }
  if systemd_running; then
    systemctl disable --now egress-warden.service egress-warden-collector.service 2>/dev/null || true
  fi
  if on_this_host; then
    # Stopping leaves the programs attached (fail closed) and the byte counters pinned
    # (28 MiB of kernel memory): removal must take both away.
    "$prefix/venv/bin/warden" detach --remove-pins && say "detached every Egress Warden program, removed its pinned maps"
  else
    say "not detaching programs: they live in this host's kernel, not in $root"
  fi
  local f
  while read -r f; do
    if [ "$f" = /etc/egress-warden/policy.yaml ] && ! cmp -s "$r$f" "$here/examples/policy.yaml"; then
      say "kept $f: it differs from the default policy (your edits)"
      continue
    fi
    rm -f "$r$f" && say "removed $f"
  done < "$manifest"
  rmdir "$r/usr/share/doc/egress-warden/examples/litellm.service.d" "$r/usr/share/doc/egress-warden/examples" \
        "$r/usr/share/doc/egress-warden" 2>/dev/null || true
  rm -rf "$prefix" && say "removed /opt/egress-warden"
  if [ "$purge" = 1 ]; then
    rm -rf "$r/var/lib/egress-warden" "$r/var/log/egress-warden" "$r/run/egress-warden"
    rmdir "$r/etc/egress-warden" 2>/dev/null || true
    say "purged state, logs and run directories"
  else
    say "kept /var/lib/egress-warden and /var/log/egress-warden (--purge removes them)"
  fi
  if systemd_running; then systemctl daemon-reload; fi
}

case $action in
  install) install_everything ;;
  uninstall) uninstall_everything ;;
esac
