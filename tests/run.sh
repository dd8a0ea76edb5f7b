#!/usr/bin/env bash
# Run pusherd's whole test suite: installs the Python test extras, the phoenix.js clients used by
# the interop tests and playwright-core for the browser tests, then runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'
if command -v npm >/dev/null 2>&1; then
  (cd tests/interop && npm ci --no-audit --no-fund --loglevel=error)
  (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)   # playwright-core + phoenix for the demo page
fi
exec python3 -m pytest -p no:cacheprovider "$@"
