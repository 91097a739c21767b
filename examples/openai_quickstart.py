# Run: pip install openai && python3 examples/openai_quickstart.py
# Needs a running byokd (`cargo run --release -- serve --config config/byokd.yaml`) and an
# OpenAI key registered for the tenant:
#   printf %s "$OPENAI_API_KEY" | cargo run --release -- keys add --tenant acme --provider openai
# Env: BYOKD_URL (default http://127.0.0.1:8787), BYOKD_TENANT (default acme),
#      BYOKD_TOKEN (a platform token from `byokd token new`; used instead of the tenant header),
#      OPENAI_MODEL (default gpt-4o-mini).
"""Non-streaming and streaming chat completions through byokd with the official OpenAI SDK."""

import os

from openai import OpenAI

BYOKD_URL = os.environ.get("BYOKD_URL", "http://127.0.0.1:8787").rstrip("/")
TENANT = os.environ.get("BYOKD_TENANT", "acme")
TOKEN = os.environ.get("BYOKD_TOKEN")
MODEL = os.environ.get("OPENAI_MODEL", "gpt-4o-mini")

if TOKEN:
    # The platform token names the tenant; byokd strips it and injects the tenant's key.
    client = OpenAI(base_url=BYOKD_URL + "/v1", api_key=TOKEN)
else:
    # The SDK insists on an api_key; byokd strips it, so any value will do.
    client = OpenAI(
        base_url=BYOKD_URL + "/v1",
        api_key="unused",
        default_headers={"x-tenant-id": TENANT},
    )

messages = [{"role": "user", "content": "Say hello in five words."}]

resp = client.chat.completions.create(model=MODEL, messages=messages)
print("non-streaming:", resp.choices[0].message.content)
print("usage:", resp.usage)

# include_usage makes the provider send a final chunk with token counts, which byokd meters.
# That chunk has no choices.
stream = client.chat.completions.create(
    model=MODEL,
    messages=messages,
    stream=True,
    stream_options={"include_usage": True},
)
print("streaming: ", end="", flush=True)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
    if chunk.usage:
        print("\nusage:", chunk.usage)
