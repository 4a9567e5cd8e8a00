#!/usr/bin/env bash
# MONAI Label integration tests (tests/bundle/test_monailabel_*.py) in their own virtual environment.
#
# MONAI Label 0.8.5 imports torchvision, and PyPI's torchvision does not import beside the CPU torch 2.13.0
# wheel of the main environment ("operator torchvision::nms does not exist"), so this environment takes the
# torch 2.14.1 + torchvision 0.29.1 pair (both on this machine's disk) and numpy 1.26 (pydicom-seg,
# numpymaxflow). See bundle/docs/README.md (Serving the bundle with MONAI Label). The venv lives outside the clone and is reused: when it is already
# complete, the two pip steps below only check it (about a minute).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LABEL_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/multicure-monai/venv-label}"
mkdir -p "$(dirname "$VENV")"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
start=$(date +%s)

# 1. torch + torchvision first, with the build tools: step 2 then builds sam2 (a monailabel dependency that
#    PyPI has as an sdist only) against this torch, instead of installing a second multi-GB torch into an
#    isolated build environment (14 min instead of under 5 here)
"$PY" -m pip install --quiet torch==2.14.1 torchvision==0.29.1 wheel "setuptools>=61"
# 2. the project, editable (this clone), with MONAI Label
"$PY" -m pip install --quiet --no-build-isolation -e ".[label,test]"
echo "label venv $VENV ready in $(($(date +%s) - start)) s, $(du -sh "$VENV" | cut -f1)"
"$PY" -c "import torch, torchvision, monai, numpy, monailabel; print('torch', torch.__version__, \
'torchvision', torchvision.__version__, 'monai', monai.__version__, 'numpy', numpy.__version__, \
'monailabel', monailabel.__version__)"

MULTICURE_REQUIRE_MONAILABEL=1 "$PY" -m pytest -q -p no:cacheprovider -rsP tests/bundle/test_monailabel_config.py \
  tests/bundle/test_monailabel_server.py tests/bundle/test_monailabel_active_learning.py
