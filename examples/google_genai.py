# Run: pip install google-genai && python3 examples/google_genai.py
# Google's google-genai SDK (Gemini API) through byokd: the SDK's base URL is byokd's
# /gemini route, which forwards the rest of the path to generativelanguage.googleapis.com.
# Needs a running byokd and a Gemini key registered for the tenant:
#   printf %s "$GEMINI_API_KEY" | cargo run --release -- keys add --tenant acme --provider gemini
# Env: BYOKD_URL (default http://127.0.0.1:8787), BYOKD_TENANT (default acme),
#      BYOKD_TOKEN (a platform token; sent as the SDK's API key instead of the tenant header),
#      GEMINI_MODEL (default gemini-2.5-flash).
"""generateContent, whole and streamed, through byokd with the official google-genai SDK."""

import os

from google import genai
from google.genai import types

BYOKD_URL = os.environ.get("BYOKD_URL", "http://127.0.0.1:8787").rstrip("/")
TOKEN = os.environ.get("BYOKD_TOKEN")
MODEL = os.environ.get("GEMINI_MODEL", "gemini-2.5-flash")

# The SDK sends its api_key as x-goog-api-key: byokd reads a platform token there, or strips
# a placeholder and injects the tenant's key.
headers = {} if TOKEN else {"x-tenant-id": os.environ.get("BYOKD_TENANT", "acme")}
client = genai.Client(
    api_key=TOKEN or "unused",
    http_options=types.HttpOptions(base_url=BYOKD_URL + "/gemini", headers=headers),
)

r = client.models.generate_content(model=MODEL, contents="Say hello in five words.")
print("generate:", r.text, "| usage:", r.usage_metadata)

text = "".join(c.text or "" for c in client.models.generate_content_stream(model=MODEL, contents="Count to five."))
print("stream:", text)
