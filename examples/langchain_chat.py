# Run: pip install langchain-openai && python3 examples/langchain_chat.py
# LangChain's OpenAI chat model through byokd: only base_url and a header change.
# Needs a running byokd and an OpenAI key registered for the tenant (see openai_quickstart.py).
# Env: BYOKD_URL (default http://127.0.0.1:8787), BYOKD_TENANT (default acme),
#      BYOKD_TOKEN (a platform token; used as the api_key instead of the tenant header),
#      OPENAI_MODEL (default gpt-4o-mini).
"""invoke and stream with langchain_openai.ChatOpenAI pointed at byokd."""

import os

from langchain_openai import ChatOpenAI

BYOKD_URL = os.environ.get("BYOKD_URL", "http://127.0.0.1:8787").rstrip("/")
TOKEN = os.environ.get("BYOKD_TOKEN")

llm = ChatOpenAI(
    model=os.environ.get("OPENAI_MODEL", "gpt-4o-mini"),
    base_url=BYOKD_URL + "/v1",
    api_key=TOKEN or "unused",
    default_headers={} if TOKEN else {"x-tenant-id": os.environ.get("BYOKD_TENANT", "acme")},
    max_retries=0,
)

r = llm.invoke("Say hello in five words.")
print("invoke:", r.content, "| usage:", r.usage_metadata)
print("stream:", "".join(chunk.content for chunk in llm.stream("Count to five.")))
