#!/usr/bin/env bash
# The whole GPU check as one command on a lent GPU box (under 10 minutes on an H100), after the uploads that
# ../shared/device/stage-ort-gpu.sh prints have left its parts in /tmp/dc:
#   bash benchmarks/gpu_run.sh ONNXRUNTIME_GPU_WHEEL_NAME [gpu_check options]
# Installs onnxruntime-gpu, diffusers and diffrt under /tmp, runs the GPU check (fp16), then the GPU-marked tests; working
# files stay in /tmp/gcw, only the logs and gpu_check.json go to $OUT; the check's table is printed last.
set -uo pipefail
wheel=${1:?the onnxruntime-gpu wheel name the staging script printed}
shift
: "${OUT:?OUT must name the folder the results go to}"
root=$(pwd)
(cd /tmp/dc && cat ort.part.* > "$wheel" && python3 -m pip install -q --no-index --no-deps --target /tmp/site ./*.whl) || exit 3
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site2 "$root" || exit 3
export PYTHONPATH=/tmp/site:/tmp/site2 PYTHONUNBUFFERED=1
python3 -c "import onnxruntime as o; o.preload_dlls(); print(o.__version__, o.get_available_providers())" || exit 3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
mkdir -p /tmp/gcw
# the check first (its figures are what the run is for; fp16 rows by default, as issue 22's goals are), then the tests
timeout 420 python3 -m diffrt.benchmarks.gpu_check --out "$OUT" --work /tmp/gcw --precisions fp16 "$@" 2> /tmp/gcw/stderr.log \
  > /tmp/gcw/table.txt
status=$?
tail -c 3000 /tmp/gcw/stderr.log > "$OUT/gpu_check-stderr-tail.log"
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_end_to_end.py tests/test_cuda_fusions.py \
  tests/test_bench.py > "$OUT/pytest-gpu.log" 2>&1
echo "pytest -m gpu: $(tail -1 "$OUT/pytest-gpu.log")"
[ "$status" -eq 0 ] || { echo "gpu_check exited $status:"; tail -20 /tmp/gcw/stderr.log; }
cat /tmp/gcw/table.txt
exit "$status"
