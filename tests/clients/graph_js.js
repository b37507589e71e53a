// Drive a quotagate gateway with the Microsoft Graph JavaScript client
// (@microsoft/microsoft-graph-client 3.0.7, pinned in package.json).
//
// Run by tests/clients.rs; the same three hunting calls as graph_sdk.py:
// `first` is admitted and its rows parsed, `no_retry` meets the gateway's 429
// with the retry handler off for that call (a GraphError the caller
// inspects), `retried` meets it with the default retry handler, which
// honours Retry-After and succeeds.
//
// The library adds the token only for https Graph hosts (or https custom
// hosts) and strips Authorization elsewhere, so over the gateway's plain-HTTP
// base URL the client is built with initWithMiddleware: a static bearer
// middleware, then the library's own RetryHandler and HTTPMessageHandler.
//
// Environment: GATEWAY (http://127.0.0.1:PORT), TOKEN, QUERY. Prints JSON.
"use strict";
const {
  Client,
  HTTPMessageHandler,
  RetryHandler,
  RetryHandlerOptions,
} = require("@microsoft/microsoft-graph-client");

class StaticBearer {
  constructor(token) {
    this.token = token;
  }
  async execute(context) {
    const options = context.options || (context.options = {});
    options.headers = { ...(options.headers || {}), Authorization: `Bearer ${this.token}` };
    return this.next.execute(context);
  }
  setNext(next) {
    this.next = next;
  }
}

async function hunt(client, query, retry) {
  let request = client.api("/security/runHuntingQuery");
  if (!retry) {
    request = request.middlewareOptions([new RetryHandlerOptions(0, 0)]);
  }
  const started = performance.now();
  const seconds = () => (performance.now() - started) / 1000;
  try {
    const result = await request.post({ Query: query });
    const rows = result.results || [];
    return {
      outcome: "ok",
      rows: rows.length,
      first_x: rows.length ? String(rows[0].x).slice(0, 13) : null,
      schema: (result.schema || []).map((s) => s.name),
      seconds: seconds(),
    };
  } catch (e) {
    const headers = e.headers;
    return {
      outcome: "error",
      error_type: e.constructor.name,
      status: e.statusCode,
      retry_after: headers ? headers.get("retry-after") : null,
      throttled_by: headers ? headers.get("x-quotagate-throttled-by") : null,
      code: e.code,
      message: e.message,
      seconds: seconds(),
    };
  }
}

async function main() {
  const client = Client.initWithMiddleware({
    baseUrl: process.env.GATEWAY.replace(/\/$/, "") + "/",
    defaultVersion: "v1.0",
    middleware: chain(new StaticBearer(process.env.TOKEN), new RetryHandler(new RetryHandlerOptions()), new HTTPMessageHandler()),
  });
  const query = process.env.QUERY;
  const out = {};
  out.first = await hunt(client, query, true);
  out.no_retry = await hunt(client, query, false);
  out.retried = await hunt(client, query, true);
  console.log(JSON.stringify(out));
}

function chain(...middleware) {
  for (let i = 0; i + 1 < middleware.length; i++) {
    middleware[i].setNext(middleware[i + 1]);
  }
  return middleware[0];
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
