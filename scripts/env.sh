# Sourced by the README's commands: create (or reuse) the local virtual environment .venv, install the pinned
# requirements, and build + install vitos_ext into it (editable, with its C++/CUDA extension).
# Re-running is cheap: each step is skipped while its inputs are unchanged.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV=${VITOS_VENV:-$ROOT/.venv}
PY=$VENV/bin/python

if [ ! -x "$PY" ]; then
  echo "[vitos] creating $VENV"
  python3 -m venv "$VENV"
fi

stamp() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; }

deps=$(stamp requirements-dev.txt)
if [ "$(cat "$VENV/.vitos-deps" 2>/dev/null)" != "$deps" ]; then
  # The CUDA build of torch alone fills ~5 GB: say so up front instead of failing halfway with ENOSPC.
  free_kb=$(df -Pk "$VENV" | awk 'NR == 2 {print $4}')
  if ! "$PY" -c "import torch" 2>/dev/null && [ "${free_kb:-0}" -lt $((7 * 1024 * 1024)) ]; then
    echo "[vitos] error: installing the requirements needs about 7 GB free on the disk of $VENV;" \
      "only $((free_kb / 1024)) MB are free (set VITOS_VENV to a folder on a larger disk)" >&2
    exit 1
  fi
  echo "[vitos] installing requirements (torch, transformers, test tools; first time takes a few minutes)"
  "$PY" -m pip install -q --disable-pip-version-check -r requirements-dev.txt
  echo "$deps" >"$VENV/.vitos-deps"
fi

# The CUDA extension is built when this torch is a CUDA build and nvcc is present (setup.py decides).
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
build=$(stamp setup.py pyproject.toml CMakeLists.txt csrc/*.h csrc/*.cpp csrc/cuda/*.cu)
if [ "$(cat "$VENV/.vitos-build" 2>/dev/null)" != "$build" ] || ! "$PY" -c "import vitos_ext._C" 2>/dev/null; then
  echo "[vitos] building vitos_ext (C++ and, when available, CUDA kernels; a few minutes on 2 cores)"
  "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . >"$VENV/vitos-build.log" 2>&1 \
    || { tail -40 "$VENV/vitos-build.log"; exit 1; }
  echo "$build" >"$VENV/.vitos-build"
fi
export PATH="$VENV/bin:$PATH"
