#!/usr/bin/env bash
# Run: bash examples/curl.sh   (with byokd serving and keys registered for the tenant, e.g.
#   printf %s "$OPENAI_API_KEY" | cargo run --release -- keys add --tenant acme --provider openai
# and likewise for --provider anthropic and --provider gemini)
# Env: BYOKD_URL (default http://127.0.0.1:8787), BYOKD_TENANT (default acme),
#      BYOKD_TOKEN (a platform token from `byokd token new`; sent instead of the tenant header).
# No API key is sent: byokd injects the tenant's key. Errors from byokd itself carry an
# `x-byokd-error` header (use `curl -i` to see it).
set -euo pipefail

URL="${BYOKD_URL:-http://127.0.0.1:8787}"
TENANT="${BYOKD_TENANT:-acme}"
# Who is calling: a platform token if given, else the tenant header (trusted from loopback).
if [ -n "${BYOKD_TOKEN:-}" ]; then WHO=(-H "authorization: Bearer $BYOKD_TOKEN"); else WHO=(-H "x-tenant-id: $TENANT"); fi
# --fail-with-body: a byokd or provider error still prints its JSON, and the script fails.
curl() { command curl --fail-with-body "$@"; }

echo "== OpenAI: /v1/chat/completions (the tenant's default provider)"
curl -sS "$URL/v1/chat/completions" \
  "${WHO[@]}" \
  -H 'content-type: application/json' \
  -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in five words."}]}'
echo

echo "== OpenAI, streaming (include_usage so byokd can meter it)"
curl -sSN "$URL/v1/chat/completions" \
  "${WHO[@]}" \
  -H 'content-type: application/json' \
  -d '{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Say hello in five words."}]}'
echo

echo "== Anthropic: /anthropic/v1/messages (anthropic-version is added if absent)"
curl -sS "$URL/anthropic/v1/messages" \
  "${WHO[@]}" \
  -H 'content-type: application/json' \
  -d '{"model":"claude-haiku-4-5","max_tokens":256,"messages":[{"role":"user","content":"Say hello in five words."}]}'
echo

echo "== Gemini: generateContent"
curl -sS "$URL/gemini/v1beta/models/gemini-2.0-flash:generateContent" \
  "${WHO[@]}" \
  -H 'content-type: application/json' \
  -d '{"contents":[{"parts":[{"text":"Say hello in five words."}]}]}'
echo

echo "== Gemini: streamGenerateContent as server-sent events"
curl -sSN "$URL/gemini/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse" \
  "${WHO[@]}" \
  -H 'content-type: application/json' \
  -d '{"contents":[{"parts":[{"text":"Say hello in five words."}]}]}'
echo

echo "== Anthropic through the OpenAI route, by model name (only model is rewritten)"
curl -sS "$URL/v1/chat/completions" \
  "${WHO[@]}" \
  -H 'content-type: application/json' \
  -d '{"model":"anthropic/claude-haiku-4-5","messages":[{"role":"user","content":"Say hello in five words."}]}'
echo
