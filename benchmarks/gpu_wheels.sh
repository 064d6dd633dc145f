#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh needs that the lent GPU machine lacks (it has torch, timm,
# transformers, numpy, Pillow, OpenCV, safetensors but no package registry): ruamel.yaml and
# webdataset with their dependencies, for Python 3.12 on x86-64 Linux.
#
#   benchmarks/gpu_wheels.sh download   # here, with the registry: the wheels into .whl/ (git-ignored)
#   benchmarks/gpu_wheels.sh install    # there: from .whl/ into .whl/site, which gpu_check.sh puts on PYTHONPATH
#
# .whl/ is ignored by git, so name it among the paths carried to the GPU machine with the working
# tree (DEVELOPERS.md). PYTHON picks the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# ruamel.yaml needs ruamel.yaml.clib (C speed-ups, optional) on CPython < 3.14; webdataset needs
# braceexpand and PyYAML (and numpy, which the machine has)
WHEELS="ruamel.yaml ruamel.yaml.clib webdataset braceexpand pyyaml"
case "${1:-}" in
  download)
    mkdir -p .whl
    "$PY" -m pip download --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
      -d .whl $WHEELS
    ls .whl ;;
  install)
    [ -d .whl ] || { echo "error: no .whl/ here: run '$0 download' on a machine with the package registry and carry .whl/ along" >&2; exit 2; }
    rm -rf .whl/site && mkdir -p .whl/site
    if "$PY" -m pip --version > /dev/null 2>&1; then
      "$PY" -m pip install --no-index --no-deps --find-links .whl --target .whl/site $WHEELS
    else  # no pip: a wheel is a zip file to unpack into the target
      for wheel in .whl/*.whl; do "$PY" -m zipfile -e "$wheel" .whl/site; done
    fi
    PYTHONPATH="$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c 'import ruamel.yaml, webdataset; print("installed in .whl/site: ruamel.yaml", ruamel.yaml.__version__, "webdataset", webdataset.__version__)' ;;
  *) sed -n '2,12p' "$0"; exit 2 ;;
esac
