"""The official OpenAI Python SDK reaching Gemini through byokd by model name, on Gemini's
OpenAI-compatible endpoint: JSON and streaming.

Run by tests/sdk.rs: python3 openai_sdk_by_model_gemini.py BASE_URL TENANT
"""
import sys

from openai import OpenAI

base, tenant = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=f"{base}/v1", api_key="app-side-placeholder", default_headers={"x-tenant-id": tenant}, max_retries=0)

r = client.chat.completions.create(model="gemini/gemini-2.5-flash", messages=[{"role": "user", "content": "hi"}])
# The fake echoes the model it was sent: byokd passed Gemini's own name.
assert r.model == "gemini-2.5-flash", r
assert r.usage.prompt_tokens == 11 and r.usage.completion_tokens == 7, r.usage

chunks = list(client.chat.completions.create(model="gemini/gemini-2.5-flash", messages=[{"role": "user", "content": "hi"}], stream=True))
assert chunks and all(c.usage is None for c in chunks), chunks
print("openai sdk by model (gemini) ok")
