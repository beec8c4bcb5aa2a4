#!/usr/bin/env bash
# Set up .venv (see env.sh) and run the main job on its embedded default. Extra arguments go to `vitos-ext demo`.
source "$(dirname "$0")/env.sh"
exec "$VENV/bin/vitos-ext" demo "$@"
