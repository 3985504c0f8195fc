// N socket.io-client connections to one server, for benchmarks/storm_bench.py:
// `node storm.mjs <url> <n> <transports> [plain|helper]`. Plain: default reconnection
// settings, what an application that never heard of the policy gets; helper: each made by
// the project's connectWithPolicy, which follows the server's advice. Prints JSON lines:
//   all    every client is connected (`t`, ms since start)
//   down   the first disconnect after `all`: the server went away
//   count  `connected`, every 250 ms
import { io } from "socket.io-client";
import { connectWithPolicy } from "@policy-engine/client";

const [url, n, transports = "websocket", kind = "plain"] = process.argv.slice(2);
const total = Number(n);
const start = performance.now();
const log = (event, fields = {}) =>
  process.stdout.write(
    `${JSON.stringify({ event, t: Math.round(performance.now() - start), ...fields })}\n`,
  );
let connected = 0;
let whole = false;
function observe(socket) {
  let up = false;
  socket.on("connect", () => {
    up = true;
    connected += 1;
    if (connected === total) {
      whole = true;
      log("all");
    }
  });
  socket.on("disconnect", () => {
    if (!up) return; // a refused connect also ends in "disconnect"
    up = false;
    connected -= 1;
    if (whole) {
      whole = false;
      log("down");
    }
  });
  return socket;
}
for (let i = 0; i < total; i += 1) {
  const options = {
    transports: transports.split(","),
    forceNew: true,
    query: { conversation_id: `storm-${i % 50}` },
    // One address per client, as behind a proxy the policy trusts (the bench's policy
    // lists the loopback as one): per-address limits apply to each client, not to all.
    extraHeaders: { "x-forwarded-for": `10.${(i >> 16) & 255}.${(i >> 8) & 255}.${i & 255}` },
  };
  if (kind === "helper") {
    connectWithPolicy((target, opts) => observe(io(target, opts)), url, {
      socketOptions: options,
    }).catch((error) => log("gave_up", { message: String(error?.message ?? error) }));
  } else {
    observe(io(url, options));
  }
}
setInterval(() => log("count", { connected }), 250);
