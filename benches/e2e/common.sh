# Shared by the end-to-end benches (sourced, not run): a work folder removed at exit once every
# server started here has exited, and the JSON upstream they all use.

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

# The byokd under test: BIN if set, else built with PROFILE (`dist`, as shipped; `release` for
# a quicker build).
PROFILE=${PROFILE:-dist}
if [ -z "${BIN:-}" ]; then
  cargo build --profile "$PROFILE" --quiet --bin byokd
  BIN=target/$PROFILE/byokd
fi

# The fixed chat completion the upstream answers every request with.
BODY='{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello!"},"finish_reason":"stop"}],"usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}}'

# nginx settings every nginx here shares: no access log, long keep-alive, temp files in $work.
common_http="access_log off; keepalive_requests 1000000;
  client_body_temp_path $work/body; proxy_temp_path $work/proxy;
  fastcgi_temp_path $work/fcgi; uwsgi_temp_path $work/uwsgi; scgi_temp_path $work/scgi;"

# start_upstream PORT: the JSON upstream, its own one-worker nginx, so it is not counted in
# any proxy's CPU.
start_upstream() {
  cat > "$work/upstream.conf" <<NGX
worker_processes 1;
pid $work/upstream.pid;
error_log $work/upstream-error.log warn;
events { worker_connections 4096; }
http {
  $common_http
  server {
    listen 127.0.0.1:$1;
    location / { default_type application/json; return 200 '$BODY'; }
  }
}
NGX
  nginx -c "$work/upstream.conf" -g 'daemon off;' & pids+=($!)
}

# What every nginx location proxying to a provider does here: replace the app's auth with the
# key ($1), keep upstream connections alive, buffer nothing.
nginx_inject() {
  printf '%s' 'proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header Authorization "Bearer '"$1"'"; proxy_set_header x-tenant-id ""; proxy_buffering off; proxy_request_buffering off;'
}

# HAProxy for the same job: keep-alive to the upstream shared across clients, no delay.
haproxy_defaults='defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option http-no-delay
  http-reuse always'
# A backend's header injection, with the key $1.
haproxy_inject() {
  printf '  http-request set-header Authorization "Bearer %s"\n  http-request del-header x-tenant-id' "$1"
}
