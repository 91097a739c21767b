#!/usr/bin/env bash
# Tenant-scale bench: byokd with TENANTS tenants (10,000 by default), each with its own key in
# the file store under the local KEK, against the same byokd serving one tenant.
#   1. throughput (wrk, CONNECTIONS connections, DURATION) with every request from one tenant;
#   2. the same with requests spread round-robin over every tenant: each key is decrypted once
#      and then served from the cache, every tenant takes its metric series;
#   3. resident memory: after start (store loaded, nothing decrypted), after the one-tenant
#      run, after every key is cached, and per cached tenant;
#   4. a /metrics scrape with every tenant in it: time (median and worst of 5) and size.
# Targets (issue 10): spread throughput within 10% of one tenant's, RSS under 64 MiB with every
# key cached, a scrape under 100 ms.
#
#   bash benches/e2e/tenants.sh         # TENANTS=10000 DURATION=10s CONNECTIONS=32
set -euo pipefail
cd "$(dirname "$0")/../.."
TENANTS=${TENANTS:-10000}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-32}
command -v nginx >/dev/null && command -v wrk >/dev/null || {
  echo "needs nginx and wrk: apt-get install -y nginx-light wrk" >&2; exit 2; }

# shellcheck source=benches/e2e/common.sh
. benches/e2e/common.sh

cargo build --release --quiet --example seed
UP=18090; BYOKD=18092; ADMIN=18093
start_upstream $UP

cat > "$work/byokd.yaml" <<YAML
listen: 127.0.0.1:$BYOKD
admin: { listen: 127.0.0.1:$ADMIN }
providers:
  openai: { kind: openai, base_url: "http://127.0.0.1:$UP" }
metrics: { max_tenants: $TENANTS }
YAML
# The embedded default: a local KEK and the file store beside the config.
$BIN --config "$work/byokd.yaml" kek generate >/dev/null
target/release/examples/seed "$work/byokd.yaml" openai "$TENANTS" "sk-bench-0123456789abcdefghijkl-"
BYOKD_LOG=warn TOKIO_WORKER_THREADS=${BYOKD_THREADS:-2} $BIN --config "$work/byokd.yaml" serve >"$work/byokd.log" 2>&1 & pids+=($!)
BYOKD_PID=$!
for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$ADMIN/readyz" && break; sleep 0.1; done

rss() { awk '/^VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
rss_start=$(rss $BYOKD_PID)

# Both runs build each request in Lua (wrk.format per request), so wrk, which shares the cores,
# costs the same in both and only the tenants differ.
cat > "$work/one.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello"}]}'
wrk.headers["content-type"] = "application/json"
local n = 0
request = function()
  wrk.headers["x-tenant-id"] = "t-" .. (n % 1)
  n = n + 1
  return wrk.format()
end
LUA
cat > "$work/spread.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello"}]}'
wrk.headers["content-type"] = "application/json"
local n = 0
request = function()
  wrk.headers["x-tenant-id"] = "t-" .. (n % $TENANTS)
  n = n + 1
  return wrk.format()
end
LUA
bench() {
  local out
  out=$(wrk -t1 -c"$CONNECTIONS" -d"$DURATION" -s "$1" "http://127.0.0.1:$BYOKD/v1/chat/completions")
  non2xx=$(awk '/Non-2xx/ {print $4}' <<<"$out")
  if [ -n "$non2xx" ]; then echo "tenants.sh: $non2xx non-2xx answers" >&2; tail -5 "$work/byokd.log" >&2; exit 1; fi
  awk '/Requests\/sec/ {printf "%.0f", $2}' <<<"$out"
}
one=$(bench "$work/one.lua")
rss_one=$(rss $BYOKD_PID)
spread=$(bench "$work/spread.lua")
rss_all=$(rss $BYOKD_PID)
spread2=$(bench "$work/spread.lua")
rss_all2=$(rss $BYOKD_PID)
threads=$(ls /proc/$BYOKD_PID/task | wc -l)

metrics=$(curl -s "http://127.0.0.1:$ADMIN/metrics")
decrypted=$(awk '/^byokd_key_decryptions_total\{/ {s += $2} END {print s + 0}' <<<"$metrics")
tenants_seen=$(grep -c '^byokd_requests_total{.*code="200"' <<<"$metrics" || true)
# Each key is decrypted once and then served from the cache: anything else is a broken cache.
if [ "$decrypted" -ne "$TENANTS" ]; then
  echo "tenants.sh: $decrypted decryptions for $TENANTS tenants" >&2; exit 1
fi
times=()
for _ in 1 2 3 4 5; do
  times+=("$(curl -s -o "$work/scrape.txt" -w '%{time_total}' "http://127.0.0.1:$ADMIN/metrics")")
done
scrape=$(printf '%s\n' "${times[@]}" | sort -n | awk '{t[NR] = $1 * 1000} END {printf "%.1f ms median, %.1f ms worst", t[3], t[5]}')
size=$(wc -c < "$work/scrape.txt")

echo "$TENANTS tenants, one key each (file store, local KEK); wrk -t1 -c$CONNECTIONS -d$DURATION; $(nproc) cores shared"
echo
echo "| measure | value |"
echo "|---|---:|"
echo "| req/s, every request from one tenant | $one |"
ratio() { awk -v a="$1" -v b="$one" 'BEGIN {printf "%.2f", a / b}'; }
echo "| req/s, spread over all $TENANTS tenants, first pass (every key decrypted, every series made) | $spread ($(ratio "$spread")×) |"
echo "| req/s, spread over all $TENANTS tenants, every key cached | $spread2 ($(ratio "$spread2")×) |"
echo "| keys decrypted (each once, then cached) | $decrypted |"
echo "| threads after the spread run | $threads |"
echo "| tenants with a request series | $tenants_seen |"
echo "| RSS after start (store loaded, nothing decrypted) | $rss_start MiB |"
echo "| RSS after the one-tenant run | $rss_one MiB |"
echo "| RSS with every key cached and every tenant's series | $rss_all MiB |"
echo "| RSS after the second spread run | $rss_all2 MiB |"
echo "| memory per cached tenant (key, series, ledger) | $(awk -v a="$rss_all" -v b="$rss_one" -v n="$TENANTS" 'BEGIN {printf "%.1f", (a - b) * 1048576 / n / 1024}') KiB |"
echo "| /metrics scrape, 5 in a row | $scrape |"
echo "| /metrics size | $(awk -v s="$size" 'BEGIN {printf "%.1f", s / 1048576}') MiB |"
