// Run: (cd examples && npm install) && node examples/openai_node.mjs
// The official OpenAI Node SDK through byokd: a chat completion, then a stream.
// Needs a running byokd and an OpenAI key registered for the tenant (see openai_quickstart.py).
// Env: BYOKD_URL (default http://127.0.0.1:8787), BYOKD_TENANT (default acme),
//      BYOKD_TOKEN (a platform token from `byokd token new`; used instead of the tenant header),
//      OPENAI_MODEL (default gpt-4o-mini).
import OpenAI from "openai";

const url = (process.env.BYOKD_URL ?? "http://127.0.0.1:8787").replace(/\/$/, "");
const token = process.env.BYOKD_TOKEN;
const client = token
  ? // The platform token names the tenant; byokd strips it and injects the tenant's key.
    new OpenAI({ baseURL: `${url}/v1`, apiKey: token, maxRetries: 0 })
  : // The SDK insists on an apiKey; byokd strips it, so any value will do.
    new OpenAI({
      baseURL: `${url}/v1`,
      apiKey: "unused",
      defaultHeaders: { "x-tenant-id": process.env.BYOKD_TENANT ?? "acme" },
      maxRetries: 0,
    });
const model = process.env.OPENAI_MODEL ?? "gpt-4o-mini";
const messages = [{ role: "user", content: "Say hello in five words." }];

const r = await client.chat.completions.create({ model, messages });
console.log("chat:", r.choices[0].message.content, "| usage:", JSON.stringify(r.usage));

let text = "";
const stream = await client.chat.completions.create({ model, messages, stream: true });
for await (const chunk of stream) {
  text += chunk.choices[0]?.delta?.content ?? "";
}
console.log("stream:", text);
