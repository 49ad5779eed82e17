#!/usr/bin/env bash
# Install firmware-app on the device (Raspberry Pi, Jetson): service user and groups, the venv under
# /opt/firmware-app, the board config, models, systemd unit and udev rules; then enable the service.
#
#   sudo tools/install-device.sh --board rpi5-coral-usb [--wheels DIR] [--extras gpio,serial,turbojpeg]
#                                [--no-start] [--keep-governor]
#   tools/install-device.sh --board rpi4-cpu --dry-run      # print what it would do, change nothing
#
# The box has no network: give --wheels DIR, a wheelhouse made on a PC for the device's platform
# (pip download --platform ... / pip wheel), and pip installs from it only (--no-index).
# Idempotent: run it again to update; steps already done are reported as "ok" and skipped. An existing
# /etc/firmware-app/board.toml that differs from --board is kept (measured crop, pins) unless --force-config.
# The CPU frequency governor is set to "performance" at every boot (systemd-tmpfiles) for steady model
# latency, unless --keep-governor.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PREFIX=/opt/firmware-app
ETC=/etc/firmware-app
DATA=/var/lib/firmware-app
SHARE=/usr/share/firmware-app
USER_NAME=firmware-app
GROUPS_NEEDED=(video gpio dialout)
UNIT=firmware-app.service
BOARD=""
WHEELS=""
EXTRAS="gpio,serial,turbojpeg"
DRY_RUN=0
START=1
FORCE_CONFIG=0
GOVERNOR=1

usage() { sed -n '2,15s/^# \{0,1\}//p' "$0"; exit "${1:-0}"; }
die() { echo "install-device: error: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --board) BOARD="${2:?--board needs a name or a file}"; shift 2 ;;
    --wheels) WHEELS="${2:?--wheels needs a folder}"; shift 2 ;;
    --extras) EXTRAS="${2?--extras needs a list}"; shift 2 ;;
    --prefix) PREFIX="${2:?--prefix needs a folder}"; shift 2 ;;
    --dry-run|-n) DRY_RUN=1; shift ;;
    --no-start) START=0; shift ;;
    --force-config) FORCE_CONFIG=1; shift ;;
    --keep-governor) GOVERNOR=0; shift ;;
    -h|--help) usage 0 ;;
    *) echo "install-device: unknown argument $1" >&2; usage 2 ;;
  esac
done

VENV="$PREFIX/venv"
[ -n "$BOARD" ] || die "--board NAME|FILE is required (one of: $(cd "$REPO/board_configs" && ls ./*.toml | sed 's|^\./||; s|\.toml$||' | tr '\n' ' '))"
if [ -f "$BOARD" ]; then BOARD_FILE="$BOARD"; else BOARD_FILE="$REPO/board_configs/$BOARD.toml"; fi
[ -f "$BOARD_FILE" ] || die "board $BOARD: $BOARD_FILE not found"
[ -z "$WHEELS" ] || [ -d "$WHEELS" ] || die "--wheels $WHEELS is not a folder"
[ "$DRY_RUN" = 1 ] || [ "$(id -u)" = 0 ] || die "run as root (sudo), or with --dry-run"

# Every change goes through run: printed, and executed unless --dry-run.
run() {
  local cmd
  cmd="$(printf '%q ' "$@")"
  echo "+ ${cmd% }"
  if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}
ok() { echo "ok: $*"; }
have() { command -v "$1" >/dev/null 2>&1; }

# Copy a file when the target is absent or differs.
put() {  # put MODE SRC DST
  if [ -f "$3" ] && cmp -s "$2" "$3"; then ok "$3 up to date"; else run install -D -m "$1" "$2" "$3"; fi
}

echo "firmware-app: installing from $REPO (board $BOARD_FILE)$([ "$DRY_RUN" = 1 ] && echo ', dry run: nothing is changed')"

# 1. groups and the service user (no login, no home of its own beyond the data dir)
for g in "${GROUPS_NEEDED[@]}"; do
  if getent group "$g" >/dev/null; then ok "group $g exists"; else run groupadd --system "$g"; fi
done
if getent passwd "$USER_NAME" >/dev/null; then
  ok "user $USER_NAME exists"
else
  run useradd --system --user-group --home-dir "$DATA" --no-create-home --shell /usr/sbin/nologin \
    --comment "firmware-app daemon" "$USER_NAME"
fi
missing=()
for g in "${GROUPS_NEEDED[@]}"; do
  id -nG "$USER_NAME" 2>/dev/null | tr ' ' '\n' | grep -qx "$g" || missing+=("$g")
done
if [ ${#missing[@]} -gt 0 ]; then
  run usermod -a -G "$(IFS=,; echo "${missing[*]}")" "$USER_NAME"
else
  ok "user $USER_NAME in ${GROUPS_NEEDED[*]}"
fi

# 2. the venv and the package (from the wheelhouse when given: the box has no network)
if [ -x "$VENV/bin/python" ]; then ok "venv $VENV exists"; else run python3 -m venv "$VENV"; fi
spec="$REPO"
[ -z "$EXTRAS" ] || spec="$REPO[$EXTRAS]"
if [ -n "$WHEELS" ]; then
  run "$VENV/bin/pip" install --no-index --find-links "$WHEELS" --upgrade "$spec"
else
  run "$VENV/bin/pip" install --upgrade "$spec"
fi

# 3. configuration, board configs and bundled models (read-only for the service)
if [ -f "$ETC/board.toml" ] && ! cmp -s "$BOARD_FILE" "$ETC/board.toml" && [ "$FORCE_CONFIG" = 0 ]; then
  echo "note: $ETC/board.toml differs from $BOARD_FILE and is kept (use --force-config to replace it)"
else
  put 0644 "$BOARD_FILE" "$ETC/board.toml"
fi
for f in "$REPO"/board_configs/*.toml; do put 0644 "$f" "$ETC/boards/$(basename "$f")"; done
if [ -d "$SHARE/models_tflite" ] && diff -rq "$REPO/models_tflite" "$SHARE/models_tflite" >/dev/null 2>&1; then
  ok "$SHARE/models_tflite up to date"
else
  run mkdir -p "$SHARE"
  run rm -rf "$SHARE/models_tflite.new"
  run cp -r "$REPO/models_tflite" "$SHARE/models_tflite.new"
  run rm -rf "$SHARE/models_tflite"
  run mv "$SHARE/models_tflite.new" "$SHARE/models_tflite"
fi

# 4. the data dir (captures, audit log, keys): the service user's only
if [ -d "$DATA" ] && [ "$(stat -c '%U %a' "$DATA")" = "$USER_NAME 700" ]; then
  ok "$DATA owned by $USER_NAME, mode 700"
else
  run install -d -o "$USER_NAME" -g "$USER_NAME" -m 0700 "$DATA"
fi

# 5. udev rules and the unit
changed_rules=0
for f in "$REPO"/systemd/*.rules; do
  dst="/etc/udev/rules.d/$(basename "$f")"
  if [ -f "$dst" ] && cmp -s "$f" "$dst"; then ok "$dst up to date"; else run install -D -m 0644 "$f" "$dst"; changed_rules=1; fi
done
if [ "$changed_rules" = 1 ] && have udevadm; then
  run udevadm control --reload-rules
  run udevadm trigger
fi
TMPFILES=/etc/tmpfiles.d/firmware-app-cpufreq.conf
if [ "$GOVERNOR" = 1 ]; then
  put 0644 "$REPO/systemd/firmware-app-cpufreq.conf" "$TMPFILES"
  if have systemd-tmpfiles; then run systemd-tmpfiles --create "$TMPFILES"; fi
elif [ -f "$TMPFILES" ]; then
  run rm -f "$TMPFILES"
fi
for f in "$REPO"/systemd/*.service "$REPO"/systemd/*.timer; do
  [ -f "$f" ] || continue
  put 0644 "$f" "/etc/systemd/system/$(basename "$f")"
done
if have systemctl; then
  run systemctl daemon-reload
  run systemctl enable "$UNIT"
  if [ "$START" = 1 ]; then run systemctl restart "$UNIT"; fi
else
  echo "note: no systemctl here; enable $UNIT by hand"
fi
echo "firmware-app: done$([ "$DRY_RUN" = 1 ] && echo ' (dry run)'). Check with: $VENV/bin/firmware-app doctor --board $ETC/board.toml"
