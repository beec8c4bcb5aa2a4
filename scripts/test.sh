#!/usr/bin/env bash
# Set up .venv (see env.sh) and run the whole test suite. Extra arguments go to pytest.
source "$(dirname "$0")/env.sh"
exec "$PY" -m pytest tests "$@"
