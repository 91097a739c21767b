#!/usr/bin/env bash
# Memory while 1 GB of SSE streams through one request: byokd's resident set is sampled
# before, during and after; the usage at the very end of the stream must still be metered.
#
# The request is a POST of a streaming chat request without stream_options, so byokd's whole
# metering path runs: the request body is read and edited (include_usage added), every chunk
# of the response goes through the usage scanner and the stripper (`"usage":null` removed
# before the `obfuscation` field), and the usage-only chunk at the end is metered and dropped.
# The upstream is a small Python server that streams SIZE_MB of OpenAI-shaped SSE. Needs
# python3 and curl.
#
#   bash benches/e2e/stream_memory.sh        # SIZE_MB=1024 by default; BIN=path to skip the build
set -euo pipefail
cd "$(dirname "$0")/../.."
SIZE_MB=${SIZE_MB:-1024}
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
[ -n "${KEEP:-}" ] && trap - EXIT && echo "work dir $work"
if [ -z "${BIN:-}" ]; then cargo build --profile dist --quiet --bin byokd; BIN=target/dist/byokd; fi
UP=${UP_PORT:-18180}; BYOKD=${BYOKD_PORT:-18182}; ADMIN=${ADMIN_PORT:-18183}

cat > "$work/upstream.py" <<'PY'
# Streams SIZE_MB of OpenAI chat chunks (2025 shape, include_usage on: "usage":null then
# "obfuscation") and a final usage-only chunk, to any POST. One block is built once and
# written repeatedly, so the upstream is not the bottleneck.
import http.server, sys
port, mb = int(sys.argv[1]), int(sys.argv[2])
chunk = ('data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",'
         '"service_tier":"default","system_fingerprint":"fp_1",'
         '"choices":[{"index":0,"delta":{"content":"' + "x" * 160 + '"},"finish_reason":null}],'
         '"usage":null,"obfuscation":"abc"}\n\n').encode()
block = chunk * ((1 << 20) // len(chunk) + 1)
blocks = (mb << 20) // len(block) + 1
tail = (b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",'
        b'"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":4242,"total_tokens":4249},'
        b'"obfuscation":"x"}\n\ndata: [DONE]\n\n')

class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        self.send_response(200); self.send_header("content-length", "2"); self.end_headers()
        self.wfile.write(b"ok")
    def do_POST(self):
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n)
        if b'"include_usage":true' not in body:
            self.send_response(400); self.send_header("content-length", "0"); self.end_headers()
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("content-length", str(blocks * len(block) + len(tail)))
        self.end_headers()
        try:
            for _ in range(blocks):
                self.wfile.write(block)
            self.wfile.write(tail)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the warm-up request hangs up after a second

http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
PY
python3 "$work/upstream.py" "$UP" "$SIZE_MB" & pids+=($!)
printf 'listen: 127.0.0.1:%s\nadmin: { listen: 127.0.0.1:%s }\nproviders:\n  openai: { kind: openai, base_url: "http://127.0.0.1:%s" }\n' $BYOKD $ADMIN $UP > "$work/byokd.yaml"
printf %s "sk-bench-0123456789abcdefghijklmnop" | $BIN --config "$work/byokd.yaml" keys add --tenant acme --provider openai >/dev/null 2>&1
BYOKD_LOG=warn $BIN --config "$work/byokd.yaml" serve >"$work/byokd.log" 2>&1 & pids+=($!)
BP=$!
for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$ADMIN/readyz" && break; sleep 0.1; done
for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$UP/" && break; sleep 0.1; done
kb() { awk -v k="$1:" '$1 == k {print $2}' "/proc/$BP/status"; }
req='{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"stream a gigabyte"}]}'
# One small request first, so the figures compare a warmed process (pools, TLS roots) with
# itself after 1 GB, not with a cold start.
_=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$BYOKD/v1/chat/completions" \
  -H 'x-tenant-id: acme' -H 'content-type: application/json' --max-time 1 -d "$req" || true)
rss_start=$(kb VmRSS); hwm_start=$(kb VmHWM)
( while sleep 0.1; do kb VmRSS; done ) > "$work/rss" 2>/dev/null & sampler=$!
start=$(date +%s.%N)
curl -s -N "http://127.0.0.1:$BYOKD/v1/chat/completions" -H 'x-tenant-id: acme' \
  -H 'content-type: application/json' -d "$req" \
  | python3 -c '
import sys
n, last, usage = 0, b"", 0
r = sys.stdin.buffer
while True:
    b = r.read(1 << 20)
    if not b: break
    n += len(b); usage += (last[-32:] + b).count(b"\"usage\""); last = b
end = repr(last[-120:].decode(errors="replace"))
open(sys.argv[1], "w").write("%d %d %s\n" % (n, usage, end))
' "$work/client"
end=$(date +%s.%N)
kill $sampler 2>/dev/null || true
sleep 0.3
rss_end=$(kb VmRSS); hwm_end=$(kb VmHWM)
peak=$(sort -n "$work/rss" | tail -1)
read -r bytes usage_seen client_tail < "$work/client"
tokens=$(curl -s "http://127.0.0.1:$ADMIN/metrics" | awk '/^byokd_tokens_total/ && /type="output"/ {print $2}')
awk -v b="$bytes" -v s="$start" -v e="$end" -v r0="$rss_start" -v h0="$hwm_start" -v rp="$peak" \
    -v r1="$rss_end" -v h1="$hwm_end" -v t="$tokens" -v u="$usage_seen" 'BEGIN {
  printf "streamed %.0f MB to the client in %.1f s (%.0f MB/s)\n", b / 1048576, e - s, b / 1048576 / (e - s);
  printf "byokd VmRSS: start %.1f MB, peak sampled %.1f MB, end %.1f MB\n", r0 / 1024, rp / 1024, r1 / 1024;
  printf "byokd VmHWM (peak RSS since start): before the stream %.1f MB, after 1 GB %.1f MB\n", h0 / 1024, h1 / 1024;
  printf "output tokens metered from the last event: %s (expected 4242)\n", t;
  printf "\"usage\" occurrences the client saw: %s (expected 0)\n", u }'
echo "client stream ends with: $client_tail"
