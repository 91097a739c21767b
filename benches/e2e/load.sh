#!/usr/bin/env bash
# End-to-end load bench: the same POST /v1/chat/completions through
#   (a) nothing (wrk straight to the upstream),
#   (b) a tuned nginx and (c) a tuned HAProxy, each doing plain header-injection proxying
#       (replace Authorization with the provider key, upstream keep-alive, no buffering):
#       the cost target, and
#   (d) byokd (identify + policy + credential + rewrite + metered streaming), access log off,
#       then with its default access log on.
# The upstream is an nginx returning a fixed chat-completion JSON. Everything runs on
# 127.0.0.1; each run is bounded by DURATION. Needs: nginx, haproxy, wrk (Debian:
# nginx-light haproxy wrk).
#
#   bash benches/e2e/load.sh            # DURATION=10s CONNECTIONS=32 by default
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-32}
THREADS=${THREADS:-1}
command -v nginx >/dev/null && command -v haproxy >/dev/null && command -v wrk >/dev/null || {
  echo "needs nginx, haproxy and wrk: apt-get install -y nginx-light haproxy wrk" >&2; exit 2; }

work=$(mktemp -d)
pids=()
# Wait for the servers to exit before removing their files: a byokd still flushing its ledger
# would race the rm.
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work" 2>/dev/null || true
}
trap cleanup EXIT

# BIN=path/to/other/byokd compares two builds on the same machine state.
if [ -z "${BIN:-}" ]; then cargo build --release --quiet; BIN=target/release/byokd; fi
UP=18080; NGX=18081; HAP=18086; BYOKD=18082; ADMIN=18083; BYOKD_LOGGED=18084; ADMIN_LOGGED=18085
BODY='{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello!"},"finish_reason":"stop"}],"usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}}'
KEY="sk-bench-0123456789abcdefghijklmnopqrstuv"

common_http="access_log off; keepalive_requests 1000000;
  client_body_temp_path $work/body; proxy_temp_path $work/proxy;
  fastcgi_temp_path $work/fcgi; uwsgi_temp_path $work/uwsgi; scgi_temp_path $work/scgi;"
# The upstream: its own nginx, one worker, so it is not counted in the proxies' CPU.
cat > "$work/upstream.conf" <<NGX
worker_processes 1;
pid $work/upstream.pid;
error_log $work/upstream-error.log warn;
events { worker_connections 4096; }
http {
  $common_http
  server {
    listen 127.0.0.1:$UP;
    location / { default_type application/json; return 200 '$BODY'; }
  }
}
NGX
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
  server {
    listen 127.0.0.1:$NGX;
    location / {
      proxy_pass http://provider;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer $KEY";
      proxy_set_header x-tenant-id "";
      proxy_buffering off;
      proxy_request_buffering off;
    }
  }
}
NGX
# HAProxy for the same job: keep-alive to the upstream shared across clients, no delay.
cat > "$work/haproxy.cfg" <<HAP
global
  maxconn 8192
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option http-no-delay
  http-reuse always
frontend fe
  bind 127.0.0.1:$HAP
  default_backend provider
backend provider
  http-request set-header Authorization "Bearer $KEY"
  http-request del-header x-tenant-id
  server up 127.0.0.1:$UP
HAP
nginx -c "$work/upstream.conf" -g 'daemon off;' & pids+=($!)
nginx -c "$work/proxy.conf" -g 'daemon off;' & pids+=($!)
NGINX_PROXY_PID=$!
haproxy -db -f "$work/haproxy.cfg" >"$work/haproxy.log" 2>&1 & pids+=($!)
HAPROXY_PID=$!

cat > "$work/byokd.yaml" <<YAML
listen: 127.0.0.1:$BYOKD
admin: { listen: 127.0.0.1:$ADMIN }
providers:
  openai: { kind: openai, base_url: "http://127.0.0.1:$UP" }
YAML
printf %s "$KEY" | $BIN --config "$work/byokd.yaml" keys add --tenant acme --provider openai >/dev/null 2>&1
BYOKD_LOG=warn TOKIO_WORKER_THREADS=${BYOKD_THREADS:-2} $BIN --config "$work/byokd.yaml" serve >"$work/byokd.log" 2>&1 & pids+=($!)
BYOKD_PID=$!
# The same, with byokd's default logging: an access-log line per request, to a file.
sed -e "s/127.0.0.1:$BYOKD/127.0.0.1:$BYOKD_LOGGED/" -e "s/127.0.0.1:$ADMIN/127.0.0.1:$ADMIN_LOGGED/" \
  "$work/byokd.yaml" > "$work/byokd-logged.yaml"
TOKIO_WORKER_THREADS=${BYOKD_THREADS:-2} $BIN --config "$work/byokd-logged.yaml" serve >"$work/byokd-logged.log" 2>&1 & pids+=($!)
BYOKD_LOGGED_PID=$!

for port in $UP $NGX $HAP $BYOKD $BYOKD_LOGGED; do
  for _ in $(seq 100); do curl -sf -o /dev/null -X POST "http://127.0.0.1:$port/v1/chat/completions" -H 'x-tenant-id: acme' && break; sleep 0.1; done
done

cat > "$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello"}]}'
wrk.headers["content-type"] = "application/json"
wrk.headers["x-tenant-id"] = "acme"
wrk.headers["authorization"] = "Bearer app-placeholder"
LUA

# CPU ticks (user+system) of a process and its children (nginx workers).
ticks() {
  local total=0 p
  for p in "$1" $(pgrep -P "$1" || true); do
    total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat")))
  done
  echo "$total"
}
HZ=$(getconf CLK_TCK)

run() {
  local name=$1 port=$2 pid=${3:-}
  local before=0 after=0
  [ -n "$pid" ] && before=$(ticks "$pid")
  out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$work/post.lua" "http://127.0.0.1:$port/v1/chat/completions")
  [ -n "$pid" ] && after=$(ticks "$pid")
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  non2xx=$(awk '/Non-2xx/ {print $4}' <<<"$out")
  cpu="-"
  [ -n "$pid" ] && cpu=$(awk -v t=$((after - before)) -v hz="$HZ" -v n="$reqs" 'BEGIN { printf "%.1f", t / hz / n * 1e6 }')
  printf '| %-32s | %10s | %8s | %8s | %8s | %s |\n' "$name" "$rps" "$p50" "$p99" "$cpu" "${non2xx:-0}"
}
echo "wrk -t$THREADS -c$CONNECTIONS -d$DURATION, $(nproc) cores shared by client, proxy and upstream"
echo "| path | req/s | p50 | p99 | proxy CPU µs/req | non-2xx |"
echo "|---|---:|---:|---:|---:|---:|"
run "direct to upstream (no proxy)" $UP
run "nginx header-injection proxy" $NGX "$NGINX_PROXY_PID"
run "HAProxy header-injection proxy" $HAP "$HAPROXY_PID"
run "byokd" $BYOKD "$BYOKD_PID"
run "byokd, access log on (default)" $BYOKD_LOGGED "$BYOKD_LOGGED_PID"
curl -s "http://127.0.0.1:$ADMIN/metrics" | grep -E '^byokd_tokens_total.*type="input"' | head -1
