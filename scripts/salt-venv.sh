#!/usr/bin/env bash
# Ensure a virtualenv with Salt VERSION exists; print its path as the last stdout line.
#
#   scripts/salt-venv.sh [VERSION]          (default 3008.5)
#
# Location: ${SALTPIPE_SALT_VENV_DIR:-$HOME/.cache/saltpipe}/salt-VERSION
# Python:   ${SALTPIPE_PYTHON:-python3} (needs >= 3.9 with the venv module)
# A marker file (.saltpipe-installed) is written only after a successful install,
# so a second call returns at once. A flock on <dir>.lock serialises concurrent
# callers. All progress goes to stderr.
#
# Extras (saltext-mysql, psycopg2-binary, PyMySQL) are installed into the venv
# when possible; failure to install them is reported but not fatal
# (marker file .saltpipe-extras-failed lists what failed).
set -euo pipefail

VERSION="${1:-3008.5}"
BASE="${SALTPIPE_SALT_VENV_DIR:-$HOME/.cache/saltpipe}"
VENV="$BASE/salt-$VERSION"
MARKER="$VENV/.saltpipe-installed"
PY="${SALTPIPE_PYTHON:-python3}"
# Extras are installed with --no-deps: saltext-mysql depends on "salt", and a
# resolver run would replace the relaxed-certifi 3008.5 with an older Salt.
# sqlparse is saltext-mysql's only other dependency.
EXTRAS=(saltext-mysql sqlparse psycopg2-binary PyMySQL)

log() { echo "salt-venv: $*" >&2; }

if [[ -f "$MARKER" ]]; then
    echo "$VENV"
    exit 0
fi

mkdir -p "$BASE"
exec 9>"$VENV.lock"
log "waiting for lock $VENV.lock"
flock 9

# Another process may have finished the install while we waited.
if [[ -f "$MARKER" ]]; then
    echo "$VENV"
    exit 0
fi

log "installing Salt $VERSION into $VENV"
rm -rf "$VENV"
"$PY" -m venv "$VENV" >&2
VPIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${VPIP[@]}" install -q --upgrade pip setuptools wheel >&2 || log "pip/setuptools upgrade failed, continuing"

plain_install() {
    "${VPIP[@]}" install "salt==$VERSION" >&2
}

# Salt releases that pin a certifi newer than the registry serves (3008.5,
# 3006.30, 3007.17, ...): install the sdist's requirements with the certifi
# line relaxed, then salt itself without dependencies.
relaxed_install() {
    local tmp
    tmp="$(mktemp -d)"
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp'" RETURN
    "${VPIP[@]}" download -q --no-deps --no-binary :all: -d "$tmp" "salt==$VERSION" >&2
    local sdist
    sdist="$(ls "$tmp"/salt-*.tar.gz | head -n1)"
    tar -xzf "$sdist" -C "$tmp"
    local src
    src="$(ls -d "$tmp"/salt-*/ | head -n1)"
    local reqs=()
    for f in base.txt zeromq.txt; do
        if [[ -f "$src/requirements/$f" ]]; then
            sed -E 's/^(certifi)[[:space:]]*[<>=!~].*$/\1/' "$src/requirements/$f" >"$tmp/relaxed-$f"
            reqs+=(-r "$tmp/relaxed-$f")
        fi
    done
    # requirements files may include each other with -r base.txt: keep the
    # relative includes resolvable by working from the requirements dir copy.
    for f in "$src"/requirements/*.txt; do
        b="$(basename "$f")"
        [[ -f "$tmp/relaxed-$b" ]] || sed -E 's/^(certifi)[[:space:]]*[<>=!~].*$/\1/' "$f" >"$tmp/relaxed-$b"
    done
    for f in "$tmp"/relaxed-*.txt; do
        sed -i -E 's#^(-r|--requirement)[[:space:]]+(\S+\.txt)#\1 relaxed-\2#' "$f"
    done
    (cd "$tmp" && "${VPIP[@]}" install "${reqs[@]}") >&2
    "${VPIP[@]}" install --no-deps "$sdist" >&2
}

case "$VERSION" in
    3008.5|3006.3[0-9]|3007.1[7-9]|3007.[2-9][0-9])
        log "using the relaxed-certifi install for $VERSION"
        relaxed_install
        ;;
    *)
        if ! plain_install; then
            log "plain pip install failed, retrying with relaxed certifi"
            relaxed_install
        fi
        ;;
esac

"$VENV/bin/salt-master" --version >&2

# Extras for later tests that point Salt's own job-cache readers at our DB.
# Salt lines that still ship salt/returners/mysql.py (before 3008) need no saltext.
if "$VENV/bin/python" -c 'import importlib.util,sys; sys.exit(0 if importlib.util.find_spec("salt.returners.mysql") else 1)' 2>/dev/null; then
    EXTRAS=(psycopg2-binary PyMySQL)
fi
failed=()
for pkg in "${EXTRAS[@]}"; do
    if ! "${VPIP[@]}" install -q --no-deps "$pkg" >&2; then
        failed+=("$pkg")
    fi
done
if ((${#failed[@]})); then
    log "WARNING: could not install extras: ${failed[*]}"
    printf '%s\n' "${failed[@]}" >"$VENV/.saltpipe-extras-failed"
else
    rm -f "$VENV/.saltpipe-extras-failed"
fi

installed="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("salt"))')"
if [[ "$installed" != "$VERSION" ]]; then
    log "ERROR: venv has salt $installed, expected $VERSION"
    exit 1
fi

date -u +%Y-%m-%dT%H:%M:%SZ >"$MARKER"
log "done: $VENV"
echo "$VENV"
