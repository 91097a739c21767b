#!/usr/bin/env bash
# Instructions per request, user space, under callgrind: nginx, HAProxy, the floor (a minimal
# hyper proxy, benches/e2e/floor.rs) and byokd with its access log off and on, each proxying
# the same chat completion with the same headers to the same JSON upstream.
#
# Unlike CPU time on a shared VM, an instruction count is the same from run to run for the same
# binary and load, so two builds can be compared to a few hundred instructions. It does not
# count the kernel's share (the TCP work, the same for every proxy here), nor cache misses or
# the bytes `rep movs` copies; `load.sh` measures CPU time. Each proxy runs alone under
# `valgrind --tool=callgrind --instr-atstart=no`; counting is switched on around N requests
# sent by `pace load` at 100 req/s (RATE) after a 2-second warm-up: slow enough that byokd
# under valgrind keeps up, so no connection is opened while counting.
#
#   bash benches/e2e/instructions.sh          # N=1000; BIN=path/to/byokd compares a build;
#                                             # PROFILE=release builds without the `dist` LTO
#   ONLY=byokd KEEP=/tmp/cg bash benches/e2e/instructions.sh   # only the paths whose name
#     contains ONLY; each path's callgrind file kept in KEEP (for callgrind_annotate)
#   CALLGRIND_ARGS=--cache-sim=yes ...       # extra callgrind options: cache misses by function
#   FLOOR=path/to/proxy ...                  # another floor build (args: LISTEN_PORT UPSTREAM_PORT)
# Fails if a path answers anything but 2xx.
# Needs: valgrind, nginx, haproxy, curl (Debian: valgrind nginx-light haproxy curl).
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${N:-1000}
RATE=${RATE:-100}
for c in valgrind callgrind_control nginx haproxy curl; do
  command -v "$c" >/dev/null || { echo "needs $c: apt-get install -y valgrind nginx-light haproxy curl" >&2; exit 2; }
done

# shellcheck source=benches/e2e/common.sh
. benches/e2e/common.sh

# The floor from byokd's profile (common.sh), so it is built the way byokd is.
cargo build --profile "$PROFILE" --quiet --example floor
cargo build --release --quiet --example pace
PACE=target/release/examples/pace
FLOOR=${FLOOR:-target/$PROFILE/examples/floor}
UP=18190; PORT=18191; ADMIN=18192; KEY=sk-bench-0123456789abcdefghijkl
start_upstream $UP

CHAT='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello"}]}'
HDRS=(--header 'content-type: application/json' --header 'x-tenant-id: acme' --header 'authorization: Bearer app-placeholder')

cat > "$work/nginx.conf" <<NGX
worker_processes 1;
master_process off;
daemon off;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections 4096; }
http {
  $common_http
  upstream provider { server 127.0.0.1:$UP; keepalive 64; }
  server {
    listen 127.0.0.1:$PORT;
    location / {
      proxy_pass http://provider;
      $(nginx_inject "$KEY")
    }
  }
}
NGX
cat > "$work/haproxy.cfg" <<HAP
global
  nbthread 1
$haproxy_defaults
frontend fe
  bind 127.0.0.1:$PORT
  default_backend provider
backend provider
$(haproxy_inject "$KEY")
  server up 127.0.0.1:$UP
HAP
cat > "$work/byokd.yaml" <<YAML
listen: 127.0.0.1:$PORT
admin: { listen: 127.0.0.1:$ADMIN }
providers:
  openai: { kind: openai, base_url: "http://127.0.0.1:$UP" }
YAML
printf %s "$KEY" | $BIN --config "$work/byokd.yaml" keys add --tenant acme --provider openai >/dev/null 2>&1

# measure NAME ENV... -- COMMAND...: instructions per request of COMMAND, run under callgrind.
results="$work/results.tsv"
measure() {
  local name=$1; shift
  if [ -n "${ONLY:-}" ] && [[ "$name" != *"$ONLY"* ]]; then return; fi
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  env "${envs[@]}" valgrind --tool=callgrind --instr-atstart=no ${CALLGRIND_ARGS:-} \
    --callgrind-out-file="$work/callgrind.out" "$@" >"$work/valgrind.log" 2>&1 &
  local vg=$!
  for _ in $(seq 300); do
    curl -sf -o /dev/null -X POST "http://127.0.0.1:$PORT/v1/chat/completions" -H 'x-tenant-id: acme' \
      -H 'content-type: application/json' -d "$CHAT" && break
    sleep 0.2
  done
  $PACE load "http://127.0.0.1:$PORT/v1/chat/completions" --rate "$RATE" --duration 2s "${HDRS[@]}" --body "$CHAT" >/dev/null
  callgrind_control -i on "$vg" >/dev/null 2>&1
  local out
  out=$($PACE load "http://127.0.0.1:$PORT/v1/chat/completions" --rate "$RATE" --duration "$(((N + RATE - 1) / RATE))s" "${HDRS[@]}" --body "$CHAT")
  callgrind_control -i off "$vg" >/dev/null 2>&1
  kill "$vg"; wait "$vg" 2>/dev/null || true
  local total
  total=$(callgrind_annotate "$work/callgrind.out" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
  local count=${out#count=}; count=${count%% *}
  printf '%s\t%s\t%s\n' "$name" "$((total / count))" "$out" >> "$results"
  if [ -n "${KEEP:-}" ]; then
    mkdir -p "$KEEP"; mv "$work/callgrind.out" "$KEEP/callgrind.${name//[^a-zA-Z0-9]/_}.out"
  fi
  rm -f "$work/callgrind.out"
}

measure "nginx" -- nginx -c "$work/nginx.conf"
measure "HAProxy" -- haproxy -db -f "$work/haproxy.cfg"
measure "floor: minimal hyper proxy" TOKIO_WORKER_THREADS=2 -- $FLOOR $PORT $UP
measure "byokd" BYOKD_LOG=warn TOKIO_WORKER_THREADS=2 -- $BIN --config "$work/byokd.yaml" serve
measure "byokd, access log on (default)" TOKIO_WORKER_THREADS=2 -- $BIN --config "$work/byokd.yaml" serve

echo "user-space instructions per request under callgrind, $N requests at $RATE req/s"
echo
awk -F'\t' '
  BEGIN {
    print "| path | instructions per request | ratio to the better of nginx and HAProxy |"
    print "|---|---:|---:|"
  }
  $1 == "nginx" || $1 == "HAProxy" { if (best == "" || $2 < best) best = $2 }
  { rows[NR] = $1; n[NR] = $2; details[NR] = $3 }
  END {
    for (i = 1; i <= NR; i++) {
      if (best == "") printf "| %s | %d | - |\n", rows[i], n[i]
      else printf "| %s | %d | %.2f |\n", rows[i], n[i], n[i] / best
    }
    for (i = 1; i <= NR; i++) if (details[i] ~ /errors=[1-9]/) { printf "%s failed requests: %s\n", rows[i], details[i]; bad = 1 }
    exit bad
  }
' "$results"
