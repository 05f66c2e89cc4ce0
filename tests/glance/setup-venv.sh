#!/usr/bin/env bash
# Create (or reuse) the virtualenv that holds a real OpenStack for the tests: glance-api and
# python-glanceclient for the realglance tests, plus keystone, openstacksdk and
# python-openstackclient (the `openstack image cache` verbs) for the interop suite
# (tests/interop/).
#
# OpenStack lives in its own venv so that its many dependencies never mix with the project's.
# The venv is reused when its marker file names the pinned versions below and the packages
# import. A working venv of the same Python whose marker differs (a pin was added or moved) is
# brought up to date in place by pip; anything else is rebuilt from PyPI.
#
#   GLANCE_TEST_VENV    where the venv lives (default ~/.cache/imgcache/glance-venv)
#   GLANCE_TEST_PYTHON  the interpreter to build it with (default python3, 3.11 here)
set -euo pipefail

GLANCE_VERSION=33.0.0
GUNICORN_VERSION=27.0.1
GLANCECLIENT_VERSION=4.13.0
KEYSTONE_VERSION=30.0.0
OPENSTACKSDK_VERSION=4.22.0
OPENSTACKCLIENT_VERSION=10.5.0

VENV="${GLANCE_TEST_VENV:-$HOME/.cache/imgcache/glance-venv}"
PYTHON="${GLANCE_TEST_PYTHON:-python3}"
MARKER="$VENV/.imgcache-glance-versions"
PINS=("glance==$GLANCE_VERSION" "gunicorn==$GUNICORN_VERSION"
      "python-glanceclient==$GLANCECLIENT_VERSION" "keystone==$KEYSTONE_VERSION"
      "openstacksdk==$OPENSTACKSDK_VERSION"
      "python-openstackclient==$OPENSTACKCLIENT_VERSION")

py_version="$("$PYTHON" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
wanted="${PINS[*]} python==$py_version"

# The venv is a working one if its marker matches and everything we need imports.
venv_ok() {
    [[ -f "$MARKER" ]] && [[ "$(cat "$MARKER")" == "$wanted" ]] \
        && [[ -x "$VENV/bin/gunicorn" && -x "$VENV/bin/glance-manage" ]] \
        && [[ -x "$VENV/bin/keystone-manage" && -x "$VENV/bin/openstack" ]] \
        && "$VENV/bin/python" -c 'import glance, glanceclient, gunicorn, keystone, openstack' \
            2>/dev/null
}

# This machine's pip config names local extra indexes that may be absent: drop that noise.
pip_install() {
    "$VENV/bin/python" -m pip install --quiet "$@" \
        2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
}

mkdir -p "$(dirname "$VENV")"
# Two runs at once (say a developer and CI) must not build the same venv together.
exec 9>"$VENV.lock"
flock 9

if venv_ok; then
    echo "glance venv ready at $VENV ($wanted); nothing to do"
    exit 0
fi

start=$SECONDS
# Same Python, a venv that imports: install what the pins add or change, keep the rest.
if [[ -x "$VENV/bin/python" ]] \
        && [[ "$("$VENV/bin/python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' \
              2>/dev/null)" == "$py_version" ]] \
        && "$VENV/bin/python" -c 'import glance, glanceclient, keystone, openstack' 2>/dev/null; then
    echo "glance venv at $VENV is out of date; installing ${PINS[*]} into it"
    if pip_install "${PINS[@]}"; then
        echo "$wanted" >"$MARKER"
        if venv_ok; then
            echo "glance venv ready at $VENV ($wanted); updated in $((SECONDS - start)) s"
            exit 0
        fi
    fi
    echo "updating $VENV in place did not work; rebuilding it"
fi
if [[ -e "$VENV" ]]; then
    if [[ ! -f "$VENV/pyvenv.cfg" && -n "$(ls -A "$VENV")" ]]; then
        echo "error: $VENV exists but is not a virtualenv; remove it or set GLANCE_TEST_VENV" >&2
        exit 1
    fi
    echo "glance venv at $VENV is stale or incomplete; rebuilding it"
    rm -rf "$VENV"
fi

echo "creating glance venv at $VENV with $PYTHON ($py_version)"
"$PYTHON" -m venv "$VENV"
echo "installing ${PINS[*]} from PyPI"
pip_install "${PINS[@]}"
echo "$wanted" >"$MARKER"

if ! venv_ok; then
    echo "error: glance venv at $VENV does not work after installing" >&2
    exit 1
fi
echo "glance venv ready at $VENV ($wanted); built in $((SECONDS - start)) s"
