"""Drive a quotagate gateway with the Microsoft Graph Python SDK (msgraph-sdk).

Run by tests/clients.rs. The SDK is used the way a user would point it at a
local gateway: a TokenCredential that returns a fixed token, and the request
adapter's base URL set to the gateway. Three hunting calls, in order:

1. `first`: admitted; the SDK parses the results rows.
2. `no_retry`: the window is full and the policy rejects; with the SDK's retry
   handler switched off for this call, the gateway's 429 surfaces as an
   ODataError (an APIError) whose status, headers and error code we report.
3. `retried`: the same full window with the SDK's default retry handler: it
   honours Retry-After, sleeps, retries, and the call succeeds.

Environment: GATEWAY (http://127.0.0.1:PORT), TOKEN (a bearer JWT), QUERY.
Prints one JSON object on stdout.
"""

import asyncio
import json
import os
import time

from azure.core.credentials import AccessToken, TokenCredential
from kiota_abstractions.base_request_configuration import RequestConfiguration
from kiota_http.middleware.options import RetryHandlerOption
from msgraph import GraphServiceClient
from msgraph.generated.models.o_data_errors.o_data_error import ODataError
from msgraph.generated.security.microsoft_graph_security_run_hunting_query.run_hunting_query_post_request_body import (
    RunHuntingQueryPostRequestBody,
)


class StaticToken(TokenCredential):
    """A credential that always returns the same (unsigned) access token."""

    def __init__(self, token):
        self._token = token

    def get_token(self, *scopes, **kwargs):
        return AccessToken(self._token, int(time.time()) + 3600)


def rows(result):
    """The results rows as plain dicts (the SDK keeps unknown columns in additional_data)."""
    return [dict(r.additional_data) for r in (result.results or [])]


async def hunt(client, query, retry=True):
    config = None
    if not retry:
        config = RequestConfiguration(options=[RetryHandlerOption(max_retries=0, should_retry=False)])
    body = RunHuntingQueryPostRequestBody(query=query)
    started = time.monotonic()
    try:
        result = await client.security.microsoft_graph_security_run_hunting_query.post(
            body, request_configuration=config
        )
    except ODataError as e:
        headers = {k.lower(): v for k, v in (e.response_headers or {}).items()}
        return {
            "outcome": "error",
            "error_type": type(e).__name__,
            "status": e.response_status_code,
            "retry_after": headers.get("retry-after"),
            "throttled_by": headers.get("x-quotagate-throttled-by"),
            "code": e.error.code if e.error else None,
            "message": e.error.message if e.error else None,
            "seconds": time.monotonic() - started,
        }
    got = rows(result)
    return {
        "outcome": "ok",
        "rows": len(got),
        # The first row's column, shortened (the emulator pads rows to 1 KB).
        "first_x": str(got[0].get("x"))[:13] if got else None,
        "schema": [s.name for s in (result.schema or [])],
        "seconds": time.monotonic() - started,
    }


async def main():
    client = GraphServiceClient(StaticToken(os.environ["TOKEN"]), ["https://graph.microsoft.com/.default"])
    client.request_adapter.base_url = os.environ["GATEWAY"].rstrip("/") + "/v1.0"
    query = os.environ["QUERY"]
    out = {}
    out["first"] = await hunt(client, query)
    out["no_retry"] = await hunt(client, query, retry=False)
    out["retried"] = await hunt(client, query)
    print(json.dumps(out))


asyncio.run(main())
