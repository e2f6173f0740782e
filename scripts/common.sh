# Sourced by scripts/setup, run and test: the one PATH they and their children use (nothing
# depends on the caller's environment), and root, asked for once.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export LC_ALL=C.UTF-8

# as_root "$0" "$@": go on as root, through sudo when it exists, or stop with the fix.
as_root() {
  [ "$(id -u)" = 0 ] && return 0
  if command -v sudo >/dev/null 2>&1; then
    exec sudo -- "$@"
  fi
  echo "$(basename "$1"): needs root (apt-get, modprobe, /dev/vhost-net); run it as root" >&2
  exit 3
}
