"""Drives byokd with the official Anthropic Python SDK: JSON, streaming, and a byokd error.

Run by tests/sdk.rs: python3 anthropic_sdk.py BASE_URL TENANT
"""
import sys

import anthropic

base, tenant = sys.argv[1], sys.argv[2]
client = anthropic.Anthropic(base_url=f"{base}/anthropic", api_key="app-side-placeholder", default_headers={"x-tenant-id": tenant}, max_retries=0)

m = client.messages.create(model="claude-3-5-haiku-20241022", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
assert m.content[0].text == "Hello from the fake", m
assert m.usage.input_tokens == 10 and m.usage.output_tokens == 5, m.usage

with client.messages.stream(model="claude-sonnet-4-20250514", max_tokens=16, messages=[{"role": "user", "content": "hi"}]) as s:
    text = "".join(s.text_stream)
    final = s.get_final_message()
assert text.startswith("tok0 "), text
assert final.usage.output_tokens == 42, final.usage

bad = anthropic.Anthropic(base_url=f"{base}/anthropic", api_key="x", default_headers={"x-tenant-id": "nobody"}, max_retries=0)
try:
    bad.messages.create(model="claude-3-5-haiku-20241022", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
    raise SystemExit("expected an AuthenticationError")
except anthropic.AuthenticationError as e:
    assert e.status_code == 401
    assert e.body["error"]["type"] == "authentication_error", e.body
print("anthropic sdk ok")
