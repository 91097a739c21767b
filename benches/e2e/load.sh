#!/usr/bin/env bash
# End-to-end load bench: the same POST /v1/chat/completions through
#   (a) nothing (wrk straight to the upstream),
#   (b) a tuned nginx and (c) a tuned HAProxy, each doing plain header-injection proxying
#       (replace Authorization with the provider key, upstream keep-alive, no buffering):
#       the cost target, and
#   (d) the floor: a minimal proxy on byokd's own stack (hyper 1 on tokio,
#       benches/e2e/floor.rs: swap Authorization, drop x-tenant-id, nothing else), so each
#       run shows how much of byokd's cost is the stack and how much its own work, and
#   (e) byokd (identify + policy + credential + rewrite + metered streaming), access log off,
#       then with its default access log on.
# For each path it measures:
#   - saturation: wrk with CONNECTIONS connections for DURATION: req/s and the proxy's CPU
#     per request (user + system ticks from /proc);
#   - a fixed 500 req/s for DURATION (open loop, `pace`): p50, p99, p99.9;
#   - unloaded (20 req/s): p50, reported as added to the direct path's;
#   - a paced stream (20 SSE events 10 ms apart from `pace upstream`): time to first byte,
#     added to the direct path's, and body frames per response (a proxy that merges chunks
#     shows fewer than direct);
#   - resident memory (VmRSS, workers included) before the first request and after the last.
# The JSON upstream is an nginx returning a fixed chat completion. Everything runs on
# 127.0.0.1. Writes two Markdown tables (figures, then ratios to the better of nginx and
# HAProxy) and, with CHART=file.svg, a chart of the ratios (benches/e2e/chart.py).
# Needs: nginx, haproxy, wrk (Debian: nginx-light haproxy wrk), python3 for the chart.
#
#   bash benches/e2e/load.sh            # DURATION=10s CONNECTIONS=32 by default
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-32}
THREADS=${THREADS:-1}
command -v nginx >/dev/null && command -v haproxy >/dev/null && command -v wrk >/dev/null || {
  echo "needs nginx, haproxy and wrk: apt-get install -y nginx-light haproxy wrk" >&2; exit 2; }

# shellcheck source=benches/e2e/common.sh
. benches/e2e/common.sh

# common.sh built byokd; BIN=path/to/other/byokd compares two builds on the same machine state.
cargo build --release --quiet --example pace
PACE=target/release/examples/pace
# The floor from byokd's profile, so it is built the way byokd is.
cargo build --profile "$PROFILE" --quiet --example floor
FLOOR=target/$PROFILE/examples/floor
UP=18080; NGX=18081; HAP=18086; BYOKD=18082; ADMIN=18083; BYOKD_LOGGED=18084; ADMIN_LOGGED=18085
SSE=18087; FLR=18088; FLR_SSE=18089
KEY="sk-bench-0123456789abcdefghijklmnopqrstuv"

inject=$(nginx_inject "$KEY")
# The reference proxy: nginx tuned for plain header injection (auto workers, upstream
# keepalive, no buffering, no access log).
cat > "$work/proxy.conf" <<NGX
worker_processes auto;
pid $work/proxy.pid;
error_log $work/proxy-error.log warn;
events { worker_connections 4096; }
http {
  $common_http
  upstream provider { server 127.0.0.1:$UP; keepalive 64; }
  upstream sse { server 127.0.0.1:$SSE; keepalive 64; }
  server {
    listen 127.0.0.1:$NGX;
    location /sse/ {
      proxy_pass http://sse/;
      $inject
    }
    location / {
      proxy_pass http://provider;
      $inject
    }
  }
}
NGX
cat > "$work/haproxy.cfg" <<HAP
global
  maxconn 8192
$haproxy_defaults
frontend fe
  bind 127.0.0.1:$HAP
  use_backend sse if { path_beg /sse/ }
  default_backend provider
backend provider
$(haproxy_inject "$KEY")
  server up 127.0.0.1:$UP
backend sse
  http-request replace-path /sse(/.*) \1
$(haproxy_inject "$KEY")
  server up 127.0.0.1:$SSE
HAP
start_upstream $UP
$PACE upstream $SSE --events 20 --gap-ms 10 & pids+=($!)
nginx -c "$work/proxy.conf" -g 'daemon off;' & pids+=($!)
NGINX_PROXY_PID=$!
haproxy -db -f "$work/haproxy.cfg" >"$work/haproxy.log" 2>&1 & pids+=($!)
HAPROXY_PID=$!

# The floor has one upstream a process: a second one carries the paced stream.
TOKIO_WORKER_THREADS=${BYOKD_THREADS:-2} $FLOOR $FLR $UP >"$work/floor.log" 2>&1 & pids+=($!)
FLOOR_PID=$!
TOKIO_WORKER_THREADS=${BYOKD_THREADS:-2} $FLOOR $FLR_SSE $SSE >"$work/floor-sse.log" 2>&1 & pids+=($!)

cat > "$work/byokd.yaml" <<YAML
listen: 127.0.0.1:$BYOKD
admin: { listen: 127.0.0.1:$ADMIN }
providers:
  openai: { kind: openai, base_url: "http://127.0.0.1:$UP" }
  sse: { kind: openai, base_url: "http://127.0.0.1:$SSE" }
YAML
for p in openai sse; do
  printf %s "$KEY" | $BIN --config "$work/byokd.yaml" keys add --tenant acme --provider $p >/dev/null 2>&1
done
BYOKD_LOG=warn TOKIO_WORKER_THREADS=${BYOKD_THREADS:-2} $BIN --config "$work/byokd.yaml" serve >"$work/byokd.log" 2>&1 & pids+=($!)
BYOKD_PID=$!
# The same, with byokd's default logging: an access-log line per request, to a file.
sed -e "s/127.0.0.1:$BYOKD/127.0.0.1:$BYOKD_LOGGED/" -e "s/127.0.0.1:$ADMIN/127.0.0.1:$ADMIN_LOGGED/" \
  "$work/byokd.yaml" > "$work/byokd-logged.yaml"
TOKIO_WORKER_THREADS=${BYOKD_THREADS:-2} $BIN --config "$work/byokd-logged.yaml" serve >"$work/byokd-logged.log" 2>&1 & pids+=($!)
BYOKD_LOGGED_PID=$!

for port in $UP $SSE $NGX $HAP $FLR $FLR_SSE $BYOKD $BYOKD_LOGGED; do
  for _ in $(seq 100); do curl -sf -o /dev/null -X POST "http://127.0.0.1:$port/v1/chat/completions" -H 'x-tenant-id: acme' && break; sleep 0.1; done
done

cat > "$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello"}]}'
wrk.headers["content-type"] = "application/json"
wrk.headers["x-tenant-id"] = "acme"
wrk.headers["authorization"] = "Bearer app-placeholder"
LUA
CHAT='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello"}]}'
STREAM='{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hello"}]}'
HDRS=(--header 'content-type: application/json' --header 'x-tenant-id: acme' --header 'authorization: Bearer app-placeholder')

# CPU ticks (user+system) of a process and its children (nginx workers).
ticks() {
  local total=0 p
  for p in "$1" $(pgrep -P "$1" || true); do
    total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat")))
  done
  echo "$total"
}
# Resident memory in KiB of a process and its children.
rss() {
  local total=0 p
  for p in "$1" $(pgrep -P "$1" || true); do
    total=$((total + $(awk '/^VmRSS/ {print $2}' "/proc/$p/status")))
  done
  echo "$total"
}
HZ=$(getconf CLK_TCK)
secs=${DURATION%s}
half=$(( secs > 3 ? secs / 2 : 2 ))s
field() { tr ' ' '\n' <<<"$2" | awk -F= -v k="$1" '$1 == k {print $2}'; }

results="$work/results.tsv"
# RSS before any load: every server has only answered the readiness probe.
declare -A idle
for pid in "${NGINX_PROXY_PID}" "${HAPROXY_PID}" "${FLOOR_PID}" "${BYOKD_PID}" "${BYOKD_LOGGED_PID}"; do idle[$pid]=$(rss "$pid"); done

run() {
  local name=$1 port=$2 pid=${3:-} stream_url=${4:-http://127.0.0.1:$2/sse/v1/chat/completions}
  local before=0 after=0
  [ -n "$pid" ] && before=$(ticks "$pid")
  out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$work/post.lua" "http://127.0.0.1:$port/v1/chat/completions")
  [ -n "$pid" ] && after=$(ticks "$pid")
  rps=$(awk '/Requests\/sec/ {printf "%.0f", $2}' <<<"$out")
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  non2xx=$(awk '/Non-2xx/ {print $4}' <<<"$out")
  cpu="-"
  [ -n "$pid" ] && cpu=$(awk -v t=$((after - before)) -v hz="$HZ" -v n="$reqs" 'BEGIN { printf "%.1f", t / hz / n * 1e6 }')
  fixed=$($PACE load "http://127.0.0.1:$port/v1/chat/completions" --rate 500 --duration "$DURATION" "${HDRS[@]}" --body "$CHAT")
  calm=$($PACE load "http://127.0.0.1:$port/v1/chat/completions" --rate 20 --duration "$half" "${HDRS[@]}" --body "$CHAT")
  stream=$($PACE load "$stream_url" --rate 20 --duration "$half" --ttfb "${HDRS[@]}" --body "$STREAM")
  local errors=$(( ${non2xx:-0} + $(field errors "$fixed") + $(field errors "$calm") + $(field errors "$stream") ))
  local rss_idle=- rss_after=-
  if [ -n "$pid" ]; then rss_idle=$(( ${idle[$pid]} / 1024 )); rss_after=$(( $(rss "$pid") / 1024 )); fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$rps" "$cpu" \
    "$(field p50_us "$fixed")" "$(field p99_us "$fixed")" "$(field p999_us "$fixed")" \
    "$(field p50_us "$calm")" "$(field p50_us "$stream")" "$(field frames "$stream")" \
    "$rss_idle" "$rss_after" "$errors" >> "$results"
}
run "direct to upstream (no proxy)" $UP "" "http://127.0.0.1:$SSE/v1/chat/completions"
run "nginx header-injection proxy" $NGX "$NGINX_PROXY_PID"
run "HAProxy header-injection proxy" $HAP "$HAPROXY_PID"
run "floor: minimal hyper proxy (byokd's stack)" $FLR "$FLOOR_PID" "http://127.0.0.1:$FLR_SSE/v1/chat/completions"
run "byokd" $BYOKD "$BYOKD_PID"
run "byokd, access log on (default)" $BYOKD_LOGGED "$BYOKD_LOGGED_PID"

echo "$(nproc) cores shared by client, proxies and upstreams; saturation: wrk -t$THREADS -c$CONNECTIONS -d$DURATION; fixed rate: 500 req/s for $DURATION; unloaded and stream: 20 req/s for $half"
echo
# Added latencies are each path's p50 minus the direct path's.
awk -F'\t' '
  NR == 1 { calm0 = $7; ttfb0 = $8 }
  BEGIN {
    print "| path | req/s | CPU µs/req | p50 @500/s | p99 @500/s | p99.9 @500/s | added p50 unloaded | added TTFB, stream | frames/stream | RSS idle MiB | RSS after MiB | errors |"
    print "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  }
  { added = NR == 1 ? "-" : ($7 - calm0) " µs"; ttfb = NR == 1 ? $8 " µs (abs)" : ($8 - ttfb0) " µs"
    printf "| %s | %s | %s | %s µs | %s µs | %s µs | %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6, added, ttfb, $9, $10, $11, $12 }
' "$results"
echo
# Ratios to the better of nginx and HAProxy (rows 2 and 3): above 1 is better for req/s,
# below 1 is better for the rest. Added latencies are floored at 10 µs: below that they are
# within the timer noise, and a ratio to ~0 would mean nothing.
awk -F'\t' '
  function best_hi(a, b) { return a > b ? a : b }
  function best_lo(a, b) { return a < b ? a : b }
  function floor1(x) { return x < 10 ? 10 : x }
  NR == 1 { calm0 = $7; ttfb0 = $8; next }
  { for (i = 1; i <= NF; i++) v[NR, i] = $i }
  NR == 3 {
    rps = best_hi(v[2,2], v[3,2]); cpu = best_lo(v[2,3], v[3,3]); p99 = best_lo(v[2,5], v[3,5])
    p999 = best_lo(v[2,6], v[3,6]); calm = floor1(best_lo(v[2,7], v[3,7]) - calm0)
    ttfb = floor1(best_lo(v[2,8], v[3,8]) - ttfb0); mem = best_lo(v[2,11], v[3,11])
    print "| ratio to the better of nginx and HAProxy | req/s (≥1 better) | CPU µs/req | p99 @500/s | p99.9 @500/s | added p50 unloaded | added TTFB | RSS after |"
    print "|---|---:|---:|---:|---:|---:|---:|---:|"
  }
  NR >= 4 {
    printf "| %s | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f |\n", $1, $2 / rps, $3 / cpu, $5 / p99, $6 / p999, floor1($7 - calm0) / calm, floor1($8 - ttfb0) / ttfb, $11 / mem
  }
' "$results"
echo
curl -s "http://127.0.0.1:$ADMIN/metrics" | grep -E '^byokd_tokens_total.*type="input"' | head -1
if [ -n "${CHART:-}" ]; then python3 benches/e2e/chart.py "$results" "$CHART"; fi
# RESULTS=file keeps the raw figures (tab-separated, one row per path, errors last).
if [ -n "${RESULTS:-}" ]; then cp "$results" "$RESULTS"; fi
