#!/usr/bin/env bash
# A/B of two (or more) wsgate binaries on one scenario, by perf samples rather than /proc ticks.
#
#   bench/ab.sh N BIN_A BIN_B [BIN ...]      # N rounds, binaries alternating within each round
#   SC=c bench/ab.sh 3 /tmp/wsgate-old target/release/wsgate
#
# Why: this kernel accounts CPU time by ticks (CONFIG_TICK_CPU_ACCOUNTING, HZ=250), so the
# user/system split of /proc/<pid>/stat is a 250 Hz sample. In a 10 s run of scenario (b) the
# user part is about 90 ticks: +-10 % per run from sampling alone, more than most changes to
# the fan-out are worth. `perf record -e cpu-clock -F 4999` over the same window gives about 20x
# the samples. Each line printed: user-space samples, samples in the fan-out's own functions,
# all samples, and the harness's tick-based figures for the same run. The runs themselves are
# `compare.sh` in PROFILE mode (fresh server per run, pinned cores, quiet-machine wait).
# Knobs: SC [b] scenario, PERF_FREQ [4999], PROFILE_SECS [8], OUT [/tmp/wsgate-ab].
set -euo pipefail
N=${1:?rounds}
shift
[ $# -ge 2 ] || { echo "usage: $0 N BIN_A BIN_B [BIN ...]" >&2; exit 2; }
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SC=${SC:-b}
OUT=${OUT:-/tmp/wsgate-ab}
mkdir -p "$OUT"
for i in $(seq "$N"); do
  for bin in "$@"; do
    name=$(basename "$bin")
    d=$OUT/$name-$SC-$i-$(date +%H%M%S)
    PROFILE=1 PROFILE_SCENARIO=$SC PERF_FREQ=${PERF_FREQ:-4999} PERF_CALLGRAPH=" " \
      PROFILE_SECS=${PROFILE_SECS:-8} BUILD=0 WSGATE_BIN=$bin RUN_DIR=$d QUIET_WAIT=30 \
      "$BENCH_DIR/compare.sh" >"$d.out" 2>&1 || { echo "$name round $i: compare.sh failed (see $d.out)"; continue; }
    dso=$(perf report -i "$d/perf.data" --sort dso --stdio -n 2>/dev/null | grep -v '^#' || true)
    total=$(awk 'NF>2 {s+=$2} END {print s+0}' <<<"$dso")
    kernel=$(awk '/kernel.kallsyms/ {print $2}' <<<"$dso")
    fanout=$(perf report -i "$d/perf.data" --sort sym --stdio -n 2>/dev/null \
      | awk '/Hub::fan_out|Outbox::offer|try_deliver/ {s+=$2} END {print s+0}')
    ticks=$(grep -o '"user_ns_per_delivery":[0-9.]*\|"cpu_ns_per_delivery":[0-9.]*' "$d/profile-results.jsonl" | tr '\n' ' ')
    echo "$name round $i: user samples $((total - ${kernel:-0})), fan-out samples $fanout, all $total | $ticks" | tee -a "$OUT/summary.txt"
  done
done
