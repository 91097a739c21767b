"""boto3's bedrock-runtime client against byokd: dummy AWS credentials (byokd strips the
client's SigV4 signature and signs anew with the tenant's key), the tenant in a header added
before signing. Prints the Converse answer's text and usage as JSON.

Usage: python3 bedrock_converse.py BASE_URL TENANT [converse|stream|stream-cut|invoke]
"""

import json
import sys

import boto3
from botocore.config import Config

base, tenant = sys.argv[1], sys.argv[2]
client = boto3.client(
    "bedrock-runtime",
    region_name="us-east-1",
    endpoint_url=f"{base}/bedrock",
    aws_access_key_id="AKIADUMMYDUMMYDUMMY0",
    aws_secret_access_key="dummy-secret-the-app-never-holds-a-real-one",
    config=Config(retries={"max_attempts": 1}),
)


def tenant_header(request, **_):
    request.headers["x-tenant-id"] = tenant


client.meta.events.register("before-sign.bedrock-runtime.*", tenant_header)
args = dict(
    modelId="anthropic.claude-3-5-haiku-20241022-v1:0",
    messages=[{"role": "user", "content": [{"text": "hi"}]}],
    inferenceConfig={"maxTokens": 64},
)
mode = sys.argv[3] if len(sys.argv) > 3 else "converse"
if mode == "invoke":
    resp = client.invoke_model(
        modelId=args["modelId"],
        body=json.dumps({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 64,
                         "messages": [{"role": "user", "content": "hi"}]}),
    )
    out = json.loads(resp["body"].read())
    print(json.dumps({"text": out["content"][0]["text"], "usage": out["usage"]}))
elif mode == "stream-cut":
    # A budget that covers two output tokens: byokd ends the stream with an exception
    # message, which the SDK raises.
    from botocore.exceptions import EventStreamError
    args["inferenceConfig"] = {"maxTokens": 2}
    text = ""
    try:
        for event in client.converse_stream(**args)["stream"]:
            if "contentBlockDelta" in event:
                text += event["contentBlockDelta"]["delta"]["text"]
        print(json.dumps({"error": None, "text": text}))
    except EventStreamError as e:
        print(json.dumps({"error": e.response["Error"]["Code"], "message": e.response["Error"]["Message"], "text": text}))
elif mode == "stream":
    # The SDK parses every frame of the event stream (CRCs checked) as it arrives.
    text, usage = "", None
    for event in client.converse_stream(**args)["stream"]:
        if "contentBlockDelta" in event:
            text += event["contentBlockDelta"]["delta"]["text"]
        if "metadata" in event:
            usage = event["metadata"]["usage"]
    print(json.dumps({"text": text, "usage": usage}))
else:
    resp = client.converse(**args)
    print(json.dumps({"text": resp["output"]["message"]["content"][0]["text"], "usage": resp["usage"]}))
