#!/usr/bin/env bash
# The wheels a lent GPU machine lacks to run the notebooks under nbmake (nbmake and a Jupyter kernel, with their
# dependencies), downloaded here for its Python 3.12 on x86-64 into the git-ignored .whl/ (about 17 MB).
#
#   bash scripts/device_wheels.sh            # here, with network access to the package registry
#
# Then, on the device machine (carry .whl; vit_helpers is used from the checkout, not installed):
#   python3 -m pip install -q --no-index --find-links .whl --target /tmp/site nbmake ipykernel \
#     && export PYTHONPATH=/tmp/site:$PWD && python3 -m pytest --nbmake notebooks
set -euo pipefail
cd "$(dirname "$0")/.."
python_version="${PYTHON_VERSION:-3.12}"
platforms=()
for platform in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
                manylinux1_x86_64; do
    platforms+=(--platform "$platform")
done
python3 -m pip download --quiet --only-binary=:all: --python-version "$python_version" --implementation cp \
    "${platforms[@]}" --dest .whl nbmake ipykernel
echo "wheels for Python $python_version in .whl/: $(ls .whl | wc -l) files, $(du -sh .whl | cut -f1)"
