"""Drive a quotagate gateway with msticpy's Microsoft Defender driver (MDATPDriver).

Run by tests/clients.rs. msticpy is pointed at the gateway the way its
connection string allows (`apiRoot`), for the Defender XDR advanced-hunting
API (data environment M365D). It gets its token from an OAuth endpoint; here a
stand-in for Entra ID on loopback answers with the test's token, so nothing
leaves the machine. Two hunting calls, in order:

1. `first`: admitted; msticpy turns the Results into a DataFrame.
2. `refused`: the window is full and the policy rejects. msticpy has no
   retry: it logs `response.json()["error"]["message"]` (so a 429 without
   Defender's JSON shape would crash it with a KeyError) and raises
   ConnectionRefusedError. We report the message it logged.

Environment: GATEWAY (http://127.0.0.1:PORT), TOKEN (a bearer JWT), TENANT,
QUERY. Prints one JSON object on stdout (msticpy's own prints go to stderr).
"""

import contextlib
import json
import logging
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

from msticpy.data.core.query_defns import DataEnvironment
from msticpy.data.drivers.mdatp_driver import MDATPDriver

TOKEN = os.environ["TOKEN"]


class TokenEndpoint(BaseHTTPRequestHandler):
    """Stands in for Entra ID's client-credentials token endpoint."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", "0")))
        body = json.dumps({"token_type": "Bearer", "expires_in": 3600, "access_token": TOKEN}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Messages(logging.Handler):
    """Keeps what msticpy logs, to report the error message it read."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.seen = []

    def emit(self, record):
        self.seen.append(record.getMessage())


def hunt(driver, query, messages):
    started = time.monotonic()
    before = len(messages.seen)
    try:
        df = driver.query(query)
    except Exception as e:  # what msticpy raises is what we report
        return {
            "outcome": "error",
            "error_type": type(e).__name__,
            "error": str(e),
            "logged": messages.seen[before:],
            "seconds": time.monotonic() - started,
        }
    return {
        "outcome": "ok",
        "type": type(df).__name__,
        "rows": len(df),
        "columns": list(df.columns),
        "first_x": str(df["x"].iloc[0])[:13] if len(df) else None,
        "seconds": time.monotonic() - started,
    }


def main():
    entra = HTTPServer(("127.0.0.1", 0), TokenEndpoint)
    threading.Thread(target=entra.serve_forever, daemon=True).start()
    messages = Messages()
    logging.getLogger("msticpy").addHandler(messages)
    out = {}
    with contextlib.redirect_stdout(sys.stderr):
        driver = MDATPDriver(data_environment=DataEnvironment.M365D)
        driver.oauth_url = f"http://127.0.0.1:{entra.server_port}/{{tenantId}}/oauth2/v2.0/token"
        driver.connect(
            f"tenant_id={os.environ['TENANT']};client_id=app;client_secret=secret;"
            f"apiRoot={os.environ['GATEWAY'].rstrip('/')}/"
        )
        out["first"] = hunt(driver, os.environ["QUERY"], messages)
        out["refused"] = hunt(driver, os.environ["QUERY"], messages)
    entra.shutdown()
    print(json.dumps(out), flush=True)


main()
# Skip the interpreter's teardown of pandas and the rest: seconds on a
# loaded machine, and nothing in it matters to the test.
os._exit(0)
