# Run: pip install anthropic && python3 examples/anthropic_quickstart.py
# Needs a running byokd (`cargo run --release -- serve --config config/byokd.yaml`) and an
# Anthropic key registered for the tenant:
#   printf %s "$ANTHROPIC_API_KEY" | cargo run --release -- keys add --tenant acme --provider anthropic
# Env: BYOKD_URL (default http://127.0.0.1:8787), BYOKD_TENANT (default acme),
#      BYOKD_TOKEN (a platform token from `byokd token new`; used instead of the tenant header),
#      ANTHROPIC_MODEL (default claude-haiku-4-5).
"""Non-streaming and streaming messages through byokd with the official Anthropic SDK."""

import os

from anthropic import Anthropic

BYOKD_URL = os.environ.get("BYOKD_URL", "http://127.0.0.1:8787").rstrip("/")
TENANT = os.environ.get("BYOKD_TENANT", "acme")
TOKEN = os.environ.get("BYOKD_TOKEN")
MODEL = os.environ.get("ANTHROPIC_MODEL", "claude-haiku-4-5")

# The SDK appends /v1/messages to base_url.
if TOKEN:
    client = Anthropic(base_url=BYOKD_URL + "/anthropic", api_key=TOKEN)
else:
    # byokd strips the SDK's api_key and injects the tenant's key.
    client = Anthropic(
        base_url=BYOKD_URL + "/anthropic",
        api_key="unused",
        default_headers={"x-tenant-id": TENANT},
    )

messages = [{"role": "user", "content": "Say hello in five words."}]

msg = client.messages.create(model=MODEL, max_tokens=256, messages=messages)
print("non-streaming:", "".join(b.text for b in msg.content if b.type == "text"))
print("usage:", msg.usage)

print("streaming: ", end="", flush=True)
with client.messages.stream(model=MODEL, max_tokens=256, messages=messages) as stream:
    for text in stream.text_stream:
        print(text, end="", flush=True)
    print("\nusage:", stream.get_final_message().usage)
