"""Drives byokd with the official OpenAI Python SDK: JSON, streaming, and a byokd error.

Run by tests/sdk.rs: python3 openai_sdk.py BASE_URL TENANT
"""
import sys

import openai
from openai import OpenAI

base, tenant = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=f"{base}/v1", api_key="app-side-placeholder", default_headers={"x-tenant-id": tenant}, max_retries=0)

r = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
assert r.choices[0].message.content == "Hello from the fake", r
assert r.usage.prompt_tokens == 11 and r.usage.completion_tokens == 7, r.usage

stream = client.chat.completions.create(
    model="gpt-4o-mini",
    messages=[{"role": "user", "content": "hi"}],
    stream=True,
    stream_options={"include_usage": True},
)
text, usage = "", None
for chunk in stream:
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
    if chunk.usage:
        usage = chunk.usage
assert text.startswith("tok0 "), text
assert usage is not None and usage.prompt_tokens == 120, usage

# Without include_usage: byokd asks for usage itself, but the SDK must see no trace of it.
chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True))
assert chunks and all(c.usage is None for c in chunks), chunks
assert all(c.choices for c in chunks), "an extra usage-only chunk reached the app"
assert "".join(c.choices[0].delta.content or "" for c in chunks).startswith("tok0 ")

# A tenant byokd does not know: the SDK raises its own typed error from byokd's body.
bad = OpenAI(base_url=f"{base}/v1", api_key="x", default_headers={"x-tenant-id": "nobody"}, max_retries=0)
try:
    bad.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    raise SystemExit("expected an AuthenticationError")
except openai.AuthenticationError as e:
    assert e.status_code == 401
    assert e.code == "unknown_tenant", e.body
    assert e.response.headers["x-byokd-error"] == "unknown_tenant"
print("openai sdk ok")
