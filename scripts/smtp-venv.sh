#!/usr/bin/env bash
# Ensure a virtualenv with aiosmtpd (a real SMTP server, for the email action's
# tests) exists; print its path as the last stdout line.
#
# Location: ${SALTPIPE_SALT_VENV_DIR:-$HOME/.cache/saltpipe}/aiosmtpd
# A marker file is written only after a successful install; a flock serialises
# concurrent callers (cargo runs tests in parallel). Progress goes to stderr.
set -euo pipefail

BASE="${SALTPIPE_SALT_VENV_DIR:-$HOME/.cache/saltpipe}"
VENV="$BASE/aiosmtpd"
MARKER="$VENV/.saltpipe-installed"
PY="${SALTPIPE_PYTHON:-python3}"

if [[ -f "$MARKER" ]]; then
    echo "$VENV"
    exit 0
fi
mkdir -p "$BASE"
exec 9>"$VENV.lock"
flock 9
if [[ -f "$MARKER" ]]; then
    echo "$VENV"
    exit 0
fi
rm -rf "$VENV"
"$PY" -m venv "$VENV" >&2
"$VENV/bin/pip" install -q --disable-pip-version-check 'aiosmtpd==1.4.6' >&2
touch "$MARKER"
echo "$VENV"
