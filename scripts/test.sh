#!/usr/bin/env bash
# Sets everything up, then runs the whole test suite as root. A run that
# executes no test (pytest exit 5) is a failure.
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/scripts/setup.sh" || exit 1
cd "$here"
.venv/bin/python -m pytest "$@"
rc=$?
if [ $rc -eq 5 ]; then echo "test: no tests ran: that is a failure" >&2; exit 1; fi
exit $rc
