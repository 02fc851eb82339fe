#!/usr/bin/env bash
# bench/gpu_session.sh: the checks that need a CUDA GPU, run in one go and time-limited, with every log
# and result gathered into one tarball. Everything else (correctness on the CPU, the kernel audit
# `python -m bench.audit`) runs without a GPU; this script is where real speed gets measured.
#
# Needs: a Linux machine with an NVIDIA GPU, and this repository installed with its test extras
# (`pip install -e ".[dev]"`: torch with CUDA, triton, pytest, pytest-benchmark). Run it from anywhere:
#
#   bash bench/gpu_session.sh                     all stages, in this order: info tests throughput moe bench profile report
#   bash bench/gpu_session.sh throughput report   just some stages
#   DEADLINE_S=600 bash bench/gpu_session.sh moe report   the grouped-GEMM and MoE-layer targets alone
#   DEADLINE_S=1800 bash bench/gpu_session.sh     a longer session (the default 540 s cuts the later stages short)
#
# Stages (and their own time limits):
#   info        nvidia-smi, torch / CUDA / triton versions, the device name (60 s)
#   tests       pytest -m gpu tests: bf16 at real sizes, torch.compile(fullgraph=True) on the GPU (300 s)
#   throughput  python -m bench.throughput: tiny with Triton and reference kernels (300 s), small with Triton (200 s)
#   moe         pytest bench/bench_moe.py --benchmark-only: the MoE layer fwd+bwd (Triton vs the reference loop
#               vs sort+index_add) first, then every grouped-GEMM role at every shape with each autotune
#               candidate's time, against dense matmul and torch._grouped_mm (480 s; the cases run 16k
#               balanced tiny/small/large first, so a cut-short run still has every preset)
#   bench       pytest bench/ --benchmark-only without bench_moe.py: the other micro-benchmarks (360 s)
#   profile     bench.throughput --profile: a step-time breakdown of tiny on Triton kernels (240 s)
#   report      python -m bench.report --readme README.md: the README's performance section from the results (60 s)
# Each stage's limit is clipped to what is left of the whole session's deadline (DEADLINE_S seconds
# from the start, default 540: 9 minutes), keeping 20 s for the report and the tarball, so a slow
# stage cannot eat the session: a stage with under 10 s left is skipped, and `report` always runs.
#
# Where results go: each stage's full output to logs/<stage>.log (its last 40 lines are echoed),
# one line per stage (limit, exit status, seconds) to logs/session.log, result JSON files to
# bench/results/ (written by bench.throughput and the benchmarks; a benchmark run rewrites its file
# after every test, so a stage stopped by its limit keeps what it finished), and logs/, bench/results/ and
# the rewritten README.md together to $OUT/gpu-session.tgz ($OUT defaults to gpu-out/ in the repository). To keep
# the results, unpack the tarball elsewhere, copy its bench/results/ files into the repository and
# run `python -m bench.report --readme README.md` there.
#
# Optional: Python wheels in .whl/ (e.g. Liger-Kernel, which bench_elementwise.py times as a peer
# when it imports) are installed offline into /tmp/site first; without them those cases are skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT" logs bench/results
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(info tests throughput moe bench profile report)
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
    moe) run_stage moe 480 python3 -m pytest -q -s bench/bench_moe.py --benchmark-only -p no:cacheprovider ;;
    bench) run_stage bench 360 python3 -m pytest -q bench/ --ignore=bench/bench_moe.py --benchmark-only -p no:cacheprovider ;;
    throughput)
      run_stage throughput-tiny 300 python3 -m bench.throughput --preset tiny --kernels both --batch-size 32 --seq-len 2048
      run_stage throughput-small 200 python3 -m bench.throughput --preset small --kernels triton --batch-size 16 --seq-len 2048
      ;;
    profile) run_stage profile 240 python3 -m bench.throughput --preset tiny --kernels triton --profile --steps 5 ;;
    report) run_stage report 60 python3 -m bench.report --readme README.md ;;
    *) echo "unknown stage $stage (info tests throughput moe bench profile report)"; exit 2 ;;
  esac
done
tar czf "$OUT/gpu-session.tgz" logs bench/results README.md
echo "results: $OUT/gpu-session.tgz"
