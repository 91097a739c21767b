"""The official OpenAI Python SDK reaching Anthropic through byokd by model name: JSON,
streaming, and the 400 for an endpoint Anthropic has no OpenAI-compatible form of.

Run by tests/sdk.rs: python3 openai_sdk_by_model.py BASE_URL TENANT
"""
import sys

import openai
from openai import OpenAI

base, tenant = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=f"{base}/v1", api_key="app-side-placeholder", default_headers={"x-tenant-id": tenant}, max_retries=0)

r = client.chat.completions.create(model="anthropic/claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}])
# The fake echoes the model it was sent: byokd passed Anthropic's own name.
assert r.model == "claude-sonnet-4-5", r
assert r.usage.prompt_tokens == 11 and r.usage.completion_tokens == 7, r.usage

chunks = list(client.chat.completions.create(model="anthropic/claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}], stream=True))
assert chunks and all(c.usage is None for c in chunks), chunks
assert "".join(c.choices[0].delta.content or "" for c in chunks).startswith("tok0 ")

try:
    client.embeddings.create(model="anthropic/claude-sonnet-4-5", input="hi")
    raise SystemExit("expected a BadRequestError")
except openai.BadRequestError as e:
    assert e.status_code == 400
    assert e.code == "bad_request", e.body
    assert "/anthropic/" in e.message, e.message
print("openai sdk by model ok")
