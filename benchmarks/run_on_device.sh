#!/usr/bin/env bash
# benchmarks/device_check.py on the GPU machine, from the checkout's root, with nothing installed:
# the wheels in $DEVICE_DATA/wheels (pydantic, PyYAML... for cp312) and orderlab itself (platform/orderlab
# with tasks/ as orderlab.tasks, the layout an install makes) are unpacked into a fresh folder on
# PYTHONPATH; the tasks read their files from $DEVICE_DATA/data. `make device-data` fills $DEVICE_DATA.
#   bash benchmarks/run_on_device.sh OUT [device_check.py options, e.g. --quick or --budget 300]
set -euo pipefail
out=${1:?usage: bash benchmarks/run_on_device.sh OUT [device_check.py options]}
shift
data=$(realpath "${DEVICE_DATA:-.device-data}")
site=$(mktemp -d)
for wheel in "$data"/wheels/*.whl; do
    python -m zipfile -e "$wheel" "$site"
done
cp -r platform/orderlab "$site/"
cp -r tasks "$site/orderlab/tasks"
PYTHONPATH="$site" ORDERLAB_DATA="$data/data" exec python benchmarks/device_check.py --out "$out" "$@"
