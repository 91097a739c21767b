"""An independent SigV4 check for the Bedrock fake: botocore's signer recomputes the
signature of a request the fake received, from the headers the request says it signed, at
the time it names, with the secret the fake was given. Prints `ok` or `mismatch`.

Reads JSON on stdin: {method, url, headers: {name: value}, signed: [names], body_b64,
access_key_id, secret, session_token, region, service, amz_date, signature}.
"""

import base64
import json
import sys

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

r = json.load(sys.stdin)
headers = {n: r["headers"][n] for n in r["signed"]}
req = AWSRequest(method=r["method"], url=r["url"], data=base64.b64decode(r["body_b64"]), headers=headers)
req.context["timestamp"] = r["amz_date"]
auth = SigV4Auth(Credentials(r["access_key_id"], r["secret"], r.get("session_token")), r["service"], r["region"])
canonical = auth.canonical_request(req)
expected = auth.signature(auth.string_to_sign(req, canonical), req)
print("ok" if expected == r["signature"] else "mismatch")
