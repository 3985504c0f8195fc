// Runs clients/js/policy-client.mjs against a live server and prints what it observed, one
// JSON object per line: `node contract.mjs <scenario> <url>`. tests/test_js_contract.py
// starts the server, runs a scenario and asserts on the lines. The `formulas` scenario needs
// no server: its argument is a JSON list of `{backoff, randoms}` cases.
//
// Every line has `event` and `t` (milliseconds on the monotonic clock). The observations
// come from listeners and a wrapped `socket.connect` installed around the helper, not from
// the helper's own bookkeeping:
//   attempt        the helper started a handshake (`socket.connect()`)
//   handshake      the Engine.IO connection opened
//   connect_error  with the `message` and `data` socket.io-client delivered
//   connected      the namespace connect was accepted
//   retry          the helper's `onRetry`: `attempt`, `delay_ms`, `payload`
//   ack            an acknowledgement: `label`, `ack`
//   rejected       the helper's promise rejected: `name`, `code`, `payload`
//   schedule       every delay of one backoff case, in milliseconds: `delays`
//   done | failed  the scenario ended (`failed` carries `message`)

import { io } from "socket.io-client";
import {
  computeDelayMs,
  connectWithPolicy,
  emitWithPolicy,
} from "@policy-engine/client";

const [scenario, url] = process.argv.slice(2);
const TIMEOUT_MS = 5_000;
const opened = [];

function log(event, fields = {}) {
  process.stdout.write(`${JSON.stringify({ event, t: performance.now(), ...fields })}\n`);
}

/** `io` with observers on every socket it creates. */
function observedIo(target, options) {
  const socket = io(target, options);
  opened.push(socket);
  const connect = socket.connect.bind(socket);
  socket.connect = () => {
    log("attempt");
    return connect();
  };
  socket.io.on("open", () => log("handshake"));
  socket.on("connect_error", (error) =>
    log("connect_error", { message: error.message, data: error.data ?? null }),
  );
  socket.on("connect", () => log("connected"));
  return socket;
}

const policyOptions = (socketOptions = {}) => ({
  socketOptions: { transports: ["websocket"], forceNew: true, ...socketOptions },
  onRetry: ({ attempt, delayMs, payload }) =>
    log("retry", { attempt, delay_ms: delayMs, payload }),
});

function rejected(error) {
  log("rejected", { name: error?.name, code: error?.code ?? null, payload: error?.payload ?? null });
}

/** A plain socket.io-client connection, outside the helper. */
function plainConnection(query) {
  return new Promise((resolve, reject) => {
    const socket = io(url, { transports: ["websocket"], forceNew: true, reconnection: false, query });
    opened.push(socket);
    socket.once("connect", () => resolve(socket));
    socket.once("connect_error", reject);
  });
}

const scenarios = {
  // The backoff formulas against the server's: each case's whole schedule, with `randoms`
  // as the random source, cycled.
  async formulas() {
    for (const { backoff, randoms } of JSON.parse(url)) {
      let drawn = 0;
      const random = () => randoms[drawn++ % randoms.length];
      const delays = [];
      let previous = null;
      for (let attempt = 1; ; attempt += 1) {
        const delay = computeDelayMs(backoff, attempt, random, previous);
        if (delay === null) break;
        delays.push(delay);
        previous = delay;
      }
      log("schedule", { delays });
    }
  },

  // The shipped policy refuses a connect without a conversation_id, for good.
  async "connect-refused"() {
    await connectWithPolicy(observedIo, url, policyOptions()).then(
      () => log("connected_unexpectedly"),
      rejected,
    );
  },

  // A connect rate limit with a burst of one: a plain connection takes the token, the
  // helper's first handshake is refused and retried after the advised wait.
  async "connect-retry"() {
    await plainConnection();
    await connectWithPolicy(observedIo, url, policyOptions());
  },

  // An event rate limit with a burst of one: the second `echo` is refused in its ack; the
  // helper's `echo` is refused too, waits, and is answered.
  async "event-refused"() {
    const socket = await connectWithPolicy(observedIo, url, policyOptions());
    for (const label of ["first", "second"]) {
      log("ack", { label, ack: await socket.timeout(TIMEOUT_MS).emitWithAck("echo", label) });
    }
    const ack = await emitWithPolicy(socket, "echo", "third", {
      timeoutMs: TIMEOUT_MS,
      onRetry: ({ attempt, delayMs, payload }) =>
        log("retry", { attempt, delay_ms: delayMs, payload }),
    });
    log("ack", { label: "third", ack });
  },

  // Connected, then the server ends the transport (the test does, when it sees `connected`
  // on stdout): the reconnection is refused by a connect rate limit, after its advice, and
  // retried when the advice says, not at socket.io-client's own pace.
  async "reconnect-refused"() {
    const socket = await connectWithPolicy(observedIo, url, policyOptions());
    await new Promise((resolve) => {
      let connects = 0;
      socket.on("connect", () => {
        connects += 1;
        if (connects === 1) resolve();
      });
    });
    socket.close();
  },

  // Connected: how socket.io-client's own reconnection is set for a dropped connection.
  async reconnection() {
    const query = { conversation_id: "c1" };
    const socket = await connectWithPolicy(observedIo, url, policyOptions({ query }));
    const manager = socket.io;
    log("reconnection", {
      enabled: manager.reconnection(),
      delay_ms: manager.reconnectionDelay(),
      delay_max_ms: manager.reconnectionDelayMax(),
      attempts: manager.reconnectionAttempts() === Infinity ? "unlimited" : manager.reconnectionAttempts(),
    });
    socket.close();
  },
};

const watchdog = setTimeout(() => {
  log("failed", { message: "the scenario did not finish in time" });
  process.exit(2);
}, 15_000);

try {
  const run = scenarios[scenario];
  if (!run) throw new Error(`unknown scenario ${JSON.stringify(scenario)}`);
  await run();
  log("done");
} catch (error) {
  log("failed", { message: String(error?.stack ?? error) });
  process.exitCode = 1;
} finally {
  for (const socket of opened) socket.disconnect();
  clearTimeout(watchdog);
}
