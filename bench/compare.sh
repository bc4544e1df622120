#!/usr/bin/env bash
# Runs the fan-out scenarios against wsgate, the floor server and Nchan in one go and prints one
# table of medians with ratios (see BENCHMARKS.md). Every server is started fresh for every
# measurement, pinned to SERVER_CPU; the generator is pinned to GEN_CPU.
#
#   bench/compare.sh                        # all scenarios, all three servers, RUNS=3
#   SMOKE=1 bench/compare.sh                # CI: 50 connections, 20 events, wsgate only; exit 1 unless all arrived
#   PROFILE=1 bench/compare.sh              # perf profile of wsgate under scenario (c) (PROFILE_SCENARIO), not counted
#                                           # (PROFILE_TARGET [wsgate] or floor, PERF_FREQ [999] Hz, PROFILE_SECS [8])
#   SCENARIOS="b c" TARGETS="wsgate floor" RUNS=5 bench/compare.sh
#
# Scenarios (sizes overridable, defaults in brackets):
#   a    idle memory: A_CONNS [15000] subscribed connections over A_TOPICS [100], RSS after A_SETTLE [3] s
#   b    B_CONNS [15000] / B_TOPICS [100] / B_RATE [200] events/s for B_SECS [10] s
#   c    C_CONNS [2000] / C_TOPICS [10] / as fast as accepted for C_SECS [10] s, C_PUBLISHERS [4] keep-alive
#        publishers, at most C_WINDOW [64] undelivered events per connection on average
#   d1   one hot topic, D_CONNS [200] subscribers, D_RATE [300] events/s, single events, D_SECS [10] s
#   d10  the same in batches of D_BATCH [10] (Nchan has no batch endpoint: 10 POSTs per batch)
#   e    publish ingest, no subscribers: E_PUBLISHERS [4] publishers as fast as accepted for E_SECS [5] s
# Other knobs: RUNS [3], TARGETS ["wsgate floor nchan"], SCENARIOS ["a b c d1 d10 e"], PAYLOAD [64]
# padding bytes per event, BUILD [1] (0: use the binaries as they are), WSGATE_BIN, BENCH_BIN,
# NCHAN_CONF [../shared/peers/nchan.conf], RUN_DIR [mktemp], SERVER_CPU [0], GEN_CPU [1],
# QUIET_PCT [10] / QUIET_WAIT [90]: before each measurement wait (at most QUIET_WAIT s) until the
# machine is below QUIET_PCT % busy, so that a neighbour's build does not skew the figures.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH_DIR")

SMOKE=${SMOKE:-0}
PROFILE=${PROFILE:-0}
RUNS=${RUNS:-3}
TARGETS=${TARGETS:-"wsgate floor nchan"}
SCENARIOS=${SCENARIOS:-"a b c d1 d10 e"}
PAYLOAD=${PAYLOAD:-64}
A_CONNS=${A_CONNS:-15000} A_TOPICS=${A_TOPICS:-100} A_SETTLE=${A_SETTLE:-3}
B_CONNS=${B_CONNS:-15000} B_TOPICS=${B_TOPICS:-100} B_RATE=${B_RATE:-200} B_SECS=${B_SECS:-10}
C_CONNS=${C_CONNS:-2000} C_TOPICS=${C_TOPICS:-10} C_SECS=${C_SECS:-10} C_PUBLISHERS=${C_PUBLISHERS:-4}
C_WINDOW=${C_WINDOW:-64} C_MAX_EVENTS=${C_MAX_EVENTS:-2000000}
D_CONNS=${D_CONNS:-200} D_RATE=${D_RATE:-300} D_SECS=${D_SECS:-10} D_BATCH=${D_BATCH:-10}
E_TOPICS=${E_TOPICS:-10} E_SECS=${E_SECS:-5} E_PUBLISHERS=${E_PUBLISHERS:-4} E_MAX_EVENTS=${E_MAX_EVENTS:-2000000}
PROFILE_SECS=${PROFILE_SECS:-8}
QUIET_PCT=${QUIET_PCT:-10}
QUIET_WAIT=${QUIET_WAIT:-90}
SERVER_CPU=${SERVER_CPU:-0}
GEN_CPU=${GEN_CPU:-1}
BUILD=${BUILD:-1}
BENCH_BIN=${BENCH_BIN:-$BENCH_DIR/target/release/wsgate-bench}
WSGATE_BIN=${WSGATE_BIN:-$ROOT/target/release/wsgate}
NCHAN_CONF=${NCHAN_CONF:-$ROOT/../shared/peers/nchan.conf}
NCHAN_PORT=9180 # fixed by the peer's config
RUN_DIR=${RUN_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/wsgate-bench.XXXXXX")}
mkdir -p "$RUN_DIR"
RESULTS=$RUN_DIR/results.jsonl
LOG=$RUN_DIR/bench.log

if [ "$SMOKE" = 1 ]; then
  TARGETS=wsgate SCENARIOS=smoke RUNS=1 QUIET_WAIT=0
elif [ "$PROFILE" = 1 ]; then
  TARGETS=${PROFILE_TARGET:-wsgate} SCENARIOS=${PROFILE_SCENARIO:-c} RUNS=1 RESULTS=$RUN_DIR/profile-results.jsonl
fi

say() { echo "compare.sh: $*" | tee -a "$LOG" >&2; }

if [ "$BUILD" = 1 ]; then
  say "building the harness (bench/, release)"
  (cd "$BENCH_DIR" && cargo build --release --locked --quiet)
  if [[ " $TARGETS " == *" wsgate "* ]]; then
    say "building wsgate (release)"
    (cd "$ROOT" && cargo build --release --locked --quiet --bin wsgate)
  fi
fi
[ -x "$BENCH_BIN" ] || { say "no harness binary at $BENCH_BIN (run with BUILD=1)"; exit 2; }
mkdir -p "$RUN_DIR/bin"
cp "$BENCH_BIN" "$RUN_DIR/bin/wsgate-bench"
BENCH_BIN=$RUN_DIR/bin/wsgate-bench
if [[ " $TARGETS " == *" wsgate "* ]]; then
  [ -x "$WSGATE_BIN" ] || { say "no wsgate binary at $WSGATE_BIN (run with BUILD=1)"; exit 2; }
  # Measure one fixed binary for the whole session, even if target/ is rebuilt meanwhile.
  cp "$WSGATE_BIN" "$RUN_DIR/bin/wsgate"
  {
    echo "# wsgate binary: $WSGATE_BIN built $(date -u -r "$WSGATE_BIN" +%FT%TZ), sha256 $(sha256sum "$WSGATE_BIN" | cut -c1-16)"
    echo "# source tree: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" status --porcelain -- src 2>/dev/null | grep -q . && echo ' + uncommitted src changes')"
  } >>"$LOG"
  WSGATE_BIN=$RUN_DIR/bin/wsgate
fi

# Open files: raise the soft limit to the hard one for the servers started from here (the
# harness raises its own too).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

PIN_SERVER=() PIN_GEN=()
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
  PIN_SERVER=(taskset -c "$SERVER_CPU") PIN_GEN=(taskset -c "$GEN_CPU")
else
  say "fewer than 2 CPUs or no taskset: server and generator are not pinned"
fi

have_nchan() {
  [ -f /usr/lib/nginx/modules/ngx_nchan_module.so ] && command -v nginx >/dev/null
}
if [[ " $TARGETS " == *" nchan "* ]]; then
  if ! have_nchan && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing the Nchan peer (nginx-light, libnginx-mod-nchan)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light libnginx-mod-nchan) >>"$LOG" 2>&1 || true
  fi
  if ! have_nchan || [ ! -f "$NCHAN_CONF" ]; then
    say "Nchan or its config ($NCHAN_CONF) missing: skipping nchan"
    TARGETS=${TARGETS//nchan/}
  fi
fi

SERVER_PID="" MEASURE_PID="" WS="" ADMIN="" SERVER_KIND=""

start_server() { # $1 = wsgate | floor | nchan; sets SERVER_PID, MEASURE_PID, WS, ADMIN
  local kind=$1 dir ports p1 p2
  dir=$RUN_DIR/$kind
  mkdir -p "$dir"
  SERVER_KIND=$kind
  case $kind in
    wsgate)
      ports=$("$BENCH_BIN" free-ports 2); p1=${ports% *}; p2=${ports#* }
      cat >"$dir/wsgate.toml" <<EOF
[server]
listen = "127.0.0.1:$p1"
[admin]
listen = "127.0.0.1:$p2"
[limits]
max_total_connections = 19000
max_connections_per_ip = 19000
max_subscriptions = 10
max_pending_connections = 4096
max_message_rate_per_minute = 600
idle_timeout = "0s"
heartbeat_interval = "0s"
heartbeat_timeout = "0s"
send_queue_messages = 256
send_queue_bytes = 1048576
[log]
level = "warn"
[shutdown]
drain_timeout = "2s"
EOF
      "${PIN_SERVER[@]}" "$WSGATE_BIN" --config "$dir/wsgate.toml" >>"$dir/server.log" 2>&1 &
      SERVER_PID=$! MEASURE_PID=$SERVER_PID WS=127.0.0.1:$p1 ADMIN=127.0.0.1:$p2
      ;;
    floor)
      ports=$("$BENCH_BIN" free-ports 2); p1=${ports% *}; p2=${ports#* }
      "${PIN_SERVER[@]}" "$BENCH_BIN" floor --listen "127.0.0.1:$p1" --admin "127.0.0.1:$p2" >>"$dir/server.log" 2>&1 &
      SERVER_PID=$! MEASURE_PID=$SERVER_PID WS=127.0.0.1:$p1 ADMIN=127.0.0.1:$p2
      ;;
    nchan)
      mkdir -p "$dir/logs"
      cp "$NCHAN_CONF" "$dir/nchan.conf"
      rm -f "$dir/nginx.pid"
      "${PIN_SERVER[@]}" nginx -c "$dir/nchan.conf" -p "$dir/" >>"$dir/server.log" 2>&1
      for _ in $(seq 100); do [ -s "$dir/nginx.pid" ] && break; sleep 0.05; done
      SERVER_PID=$(cat "$dir/nginx.pid")
      MEASURE_PID=""
      for _ in $(seq 100); do MEASURE_PID=$(pgrep -P "$SERVER_PID" | head -n1 || true); [ -n "$MEASURE_PID" ] && break; sleep 0.05; done
      WS=127.0.0.1:$NCHAN_PORT ADMIN=127.0.0.1:$NCHAN_PORT
      ;;
  esac
}

stop_server() {
  [ -n "$SERVER_PID" ] || return 0
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  for _ in $(seq 150); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$SERVER_PID" 2>/dev/null; then
    say "$SERVER_KIND (pid $SERVER_PID) did not stop in 15 s: SIGKILL"
    kill -KILL "$SERVER_PID" 2>/dev/null || true
  fi
  if [ "$SERVER_KIND" != nchan ]; then wait "$SERVER_PID" 2>/dev/null || true; fi
  if [ "$SERVER_KIND" = nchan ] && [ -n "$MEASURE_PID" ]; then
    for _ in $(seq 50); do kill -0 "$MEASURE_PID" 2>/dev/null || break; sleep 0.1; done
  fi
  SERVER_PID="" MEASURE_PID=""
}
trap stop_server EXIT

busy_pct() { # whole-machine busy % over one second
  local a b
  read -r -a a < /proc/stat; sleep 1; read -r -a b < /proc/stat
  local busy=$(( (b[1]+b[2]+b[3]+b[6]+b[7]) - (a[1]+a[2]+a[3]+a[6]+a[7]) ))
  local idle=$(( (b[4]+b[5]) - (a[4]+a[5]) ))
  echo $(( 100 * busy / (busy + idle + 1) ))
}

wait_quiet() {
  local p=0 waited=0
  while [ "$waited" -lt "$QUIET_WAIT" ]; do
    p=$(busy_pct); waited=$((waited + 1))
    [ "$p" -le "$QUIET_PCT" ] && return 0
  done
  [ "$QUIET_WAIT" -gt 0 ] && say "machine still ${p}% busy after ${QUIET_WAIT} s: measuring anyway (see other_cpu_pct)"
  return 0
}

scenario_args() { # $1 = scenario
  case $1 in
    a) echo "--conns $A_CONNS --topics $A_TOPICS --events 0 --settle $A_SETTLE" ;;
    b) echo "--conns $B_CONNS --topics $B_TOPICS --rate $B_RATE --events $((B_RATE * B_SECS)) --secs $B_SECS --settle 2" ;;
    c) echo "--conns $C_CONNS --topics $C_TOPICS --rate 0 --secs $C_SECS --events $C_MAX_EVENTS --publishers $C_PUBLISHERS --window $C_WINDOW" ;;
    d1) echo "--conns $D_CONNS --topics 1 --rate $D_RATE --events $((D_RATE * D_SECS)) --secs $D_SECS --batch 1 --publishers 1" ;;
    d10) echo "--conns $D_CONNS --topics 1 --rate $D_RATE --events $((D_RATE * D_SECS)) --secs $D_SECS --batch $D_BATCH --publishers 1" ;;
    e) echo "--conns 0 --topics $E_TOPICS --rate 0 --secs $E_SECS --events $E_MAX_EVENTS --publishers $E_PUBLISHERS" ;;
    smoke) echo "--conns 50 --topics 5 --rate 100 --events 20 --secs 5 --publishers 2 --settle 0.2 --drain 10" ;;
    *) say "unknown scenario $1"; exit 2 ;;
  esac
}

{
  echo "# $(date -u +%FT%TZ) $(uname -sr), $(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)"
  echo "# RUNS=$RUNS TARGETS='$TARGETS' SCENARIOS='$SCENARIOS' PAYLOAD=$PAYLOAD"
} >>"$LOG"
say "results in $RESULTS, log in $LOG"

FAILED=0
for run in $(seq "$RUNS"); do
  for s in $SCENARIOS; do
    for t in $TARGETS; do
      wait_quiet
      start_server "$t"
      args="--target $t --ws $WS --admin $ADMIN --server-pid ${MEASURE_PID:-none} --scenario $s --run $run --payload $PAYLOAD $(scenario_args "$s")"
      echo "+ ${PIN_GEN[*]} $BENCH_BIN run $args" >>"$LOG"
      PERF_PID=""
      if [ "$PROFILE" = 1 ]; then
        # Attach once the connections are up (the profile is of the publish phase).
        (sleep "${PROFILE_DELAY:-4}"; exec perf record -e cpu-clock -F ${PERF_FREQ:-999} ${PERF_CALLGRAPH:--g} -p "$MEASURE_PID" -o "$RUN_DIR/perf.data" -- sleep "$PROFILE_SECS") >>"$LOG" 2>&1 &
        PERF_PID=$!
      fi
      rc=0
      # shellcheck disable=SC2086
      timeout 600 "${PIN_GEN[@]}" "$BENCH_BIN" run $args >>"$RESULTS" 2> >(tee -a "$LOG" >&2) || rc=$?
      if [ -n "$PERF_PID" ]; then wait "$PERF_PID" || true; fi
      stop_server
      if [ "$rc" != 0 ]; then
        FAILED=$((FAILED + 1))
        say "$s/$t run $run: verification FAILED (exit $rc)"
      fi
    done
  done
done

if [ "$PROFILE" = 1 ]; then
  # `|| true`: head closing the pipe early is not a failure.
  perf report -i "$RUN_DIR/perf.data" --no-children --sort dso --stdio 2>/dev/null | grep -v '^#' | grep -v '^$' | head -15 | tee "$RUN_DIR/perf-dso.txt" || true
  perf report -i "$RUN_DIR/perf.data" --no-children --sort dso,symbol --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -45 | tee "$RUN_DIR/perf-top.txt" || true
  say "profile in $RUN_DIR/perf.data (perf report -i $RUN_DIR/perf.data)"
fi

echo
"$BENCH_BIN" report "$RESULTS" | tee "$RUN_DIR/table.md"
say "table in $RUN_DIR/table.md"
if [ "$FAILED" != 0 ]; then
  say "$FAILED run(s) failed verification (see $LOG)"
  exit 1
fi
