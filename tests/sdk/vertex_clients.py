"""Google's google-genai SDK (Vertex mode) and Anthropic's AnthropicVertex against byokd:
the app holds no Google credential of its own (a dummy token) and names an arbitrary project;
byokd mints the tenant's token and sends the request to the tenant's project. Prints both
answers' text and token counts as JSON.

Usage: python3 vertex_clients.py BASE_URL TENANT
"""

import json
import sys

import anthropic
import google.oauth2.credentials
from google import genai
from google.genai import types

base, tenant = sys.argv[1], sys.argv[2]
headers = {"x-tenant-id": tenant}

gclient = genai.Client(
    vertexai=True,
    project="app-side-project",
    location="us-central1",
    credentials=google.oauth2.credentials.Credentials(token="app-side-dummy-token"),
    http_options=types.HttpOptions(base_url=f"{base}/vertex", headers=headers),
)
g = gclient.models.generate_content(model="gemini-2.5-flash", contents="hi")

aclient = anthropic.AnthropicVertex(
    project_id="app-side-project",
    region="us-east5",
    access_token="app-side-dummy-token",
    base_url=f"{base}/vertex/v1",
    default_headers=headers,
)
a = aclient.messages.create(
    model="claude-sonnet-4-5@20250929",
    max_tokens=64,
    messages=[{"role": "user", "content": "hi"}],
)
print(json.dumps({
    "gemini": {"text": g.text, "total": g.usage_metadata.total_token_count},
    "anthropic": {"text": a.content[0].text, "input": a.usage.input_tokens},
}))
