#!/usr/bin/env bash
# The GPU checks of one device session, prepared in advance (the device tool runs it from the repo
# root; the device image already holds torch, triton, pytest, pytest-benchmark and the rest).
#
#   bash bench/gpu_session.sh [stage ...]   stages: info tests throughput bench profile report (default: all)
#
# Each stage has its own time limit, clipped to what is left of a session deadline (DEADLINE_S,
# default 540 s, under the device tool's 600 s per call), so a slow stage cannot eat the session
# and `report` always runs. Everything a stage prints goes to logs/, every result JSON to
# bench/results/, and both come back as one tarball in $OUT.
# Liger-Kernel, when wanted as a peer, travels as wheels in .whl/ (see the device README).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT" logs bench/results
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(info tests throughput bench profile report)
deadline=$((SECONDS + ${DEADLINE_S:-540}))

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

run_stage() {  # name, time limit in seconds, command...
  local name=$1 limit=$2; shift 2
  local left=$((deadline - SECONDS - 20))  # 20 s kept for the report and the tarball
  [ "$name" = report ] && left=$((deadline - SECONDS + 60))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then echo "== $name: skipped, no time left" | tee -a logs/session.log; return; fi
  echo "== $name (limit ${limit}s): $*" | tee -a logs/session.log
  local start=$SECONDS
  timeout "$limit" "$@" > "logs/$name.log" 2>&1
  local rc=$?
  tail -n 40 "logs/$name.log"
  echo "== $name: exit $rc after $((SECONDS - start))s" | tee -a logs/session.log
}

for stage in "${stages[@]}"; do
  case $stage in
    info) run_stage info 60 bash -c 'nvidia-smi; python3 -c "import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, torch.cuda.get_device_name())"' ;;
    tests) run_stage tests 300 python3 -m pytest -q -m gpu tests -p no:cacheprovider ;;
    bench) run_stage bench 420 python3 -m pytest -q bench/ --benchmark-only -p no:cacheprovider ;;
    throughput)
      run_stage throughput-tiny 300 python3 -m bench.throughput --preset tiny --kernels both --batch-size 32 --seq-len 2048
      run_stage throughput-small 200 python3 -m bench.throughput --preset small --kernels triton --batch-size 16 --seq-len 2048
      ;;
    profile) run_stage profile 240 python3 -m bench.throughput --preset tiny --kernels triton --profile --steps 5 ;;
    report) run_stage report 60 python3 -m bench.report --readme README.md ;;
    *) echo "unknown stage $stage (info tests throughput bench profile report)"; exit 2 ;;
  esac
done
tar czf "$OUT/gpu-session.tgz" logs bench/results README.md
echo "results: $OUT/gpu-session.tgz"
