// The client side of benchmarks/overload_bench.py: plain socket.io-client (from
// tests/js/node_modules) against one server, printing one JSON summary line.
//
//   node overload_clients.mjs idle  URL COUNT
//   node overload_clients.mjs churn URL CYCLES PARALLEL
//
// idle:  COUNT connections opened at once, as fast as the client can, then all closed.
// churn: CYCLES connect / echo with ack / disconnect cycles, PARALLEL at a time.
//
// Every connection comes from its own address (X-Forwarded-For, which the benchmark's
// policy trusts from loopback), so per-IP limits see many clients, as behind a proxy.
// Reconnection is off: a refused connect is counted, by the code the server sent, never
// retried. The connect timeout is 60 s, not the client's default 20 s: 5,000 connects at
// once take 15-25 s here, and on a busy machine the default turns them all into client
// timeouts for both modes, which says nothing about shedding. `connect_ms` is from `io()`
// to the namespace's `connect` event.

import { createRequire } from "node:module";

const require = createRequire(new URL("../tests/js/package.json", import.meta.url));
const { io } = require("socket.io-client");

const [mode, url, ...rest] = process.argv.slice(2);
const TIMEOUT_MS = 60_000;
let nextAddress = 0;

function address() {
  const n = nextAddress++;
  return `10.${(n >> 16) & 255}.${(n >> 8) & 255}.${n & 255}`;
}

/** One connect: resolves with {socket, ms} or {code}. */
function connect() {
  const started = performance.now();
  const socket = io(url, {
    transports: ["websocket"],
    reconnection: false,
    forceNew: true,
    timeout: TIMEOUT_MS,
    query: { conversation_id: "bench" },
    extraHeaders: { "X-Forwarded-For": address() },
  });
  return new Promise((resolve) => {
    socket.once("connect", () => resolve({ socket, ms: performance.now() - started }));
    socket.once("connect_error", (err) => {
      socket.close();
      resolve({ code: err?.data?.code ?? err?.message ?? "unknown" });
    });
  });
}

function record(result, outcome) {
  if (result.socket) {
    outcome.served += 1;
    outcome.connect_ms.push(result.ms);
  } else {
    outcome.refused[result.code] = (outcome.refused[result.code] ?? 0) + 1;
  }
}

function percentile(sorted, p) {
  if (sorted.length === 0) return 0;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

async function idle(count) {
  const outcome = { served: 0, refused: {}, connect_ms: [] };
  const results = await Promise.all(Array.from({ length: count }, connect));
  for (const result of results) record(result, outcome);
  for (const result of results) result.socket?.close();
  return outcome;
}

function echo(socket) {
  return new Promise((resolve) => {
    socket.timeout(TIMEOUT_MS).emit("echo", { n: 1 }, (err) => resolve(!err));
  });
}

async function churn(cycles, parallel) {
  const outcome = { served: 0, refused: {}, connect_ms: [], echo_failed: 0 };
  let left = cycles;
  async function worker() {
    while (left > 0) {
      left -= 1;
      const result = await connect();
      record(result, outcome);
      if (result.socket) {
        if (!(await echo(result.socket))) outcome.echo_failed += 1;
        result.socket.close();
      }
    }
  }
  await Promise.all(Array.from({ length: parallel }, worker));
  return outcome;
}

const started = performance.now();
const outcome =
  mode === "idle" ? await idle(Number(rest[0])) : await churn(Number(rest[0]), Number(rest[1]));
const wall_ms = performance.now() - started;
const sorted = outcome.connect_ms.sort((a, b) => a - b);
delete outcome.connect_ms;
process.stdout.write(
  `${JSON.stringify({
    ...outcome,
    wall_ms,
    connect_p50_ms: percentile(sorted, 50),
    connect_p99_ms: percentile(sorted, 99),
    connect_mean_ms: sorted.reduce((a, b) => a + b, 0) / Math.max(1, sorted.length),
  })}\n`,
);
process.exit(0);
