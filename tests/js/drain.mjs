// A socket.io-client through a server's drain: `node drain.mjs <url> <ms> [helper]`.
// Plain by default: socket.io-client's own reconnection (short delays, to keep the test
// short). With `helper`, the project's connectWithPolicy, which waits the advised delay and
// reconnects where the notice says. Prints one JSON line per thing it sees for <ms>:
//   connected      the namespace connect was accepted (again, after a reconnect), and where
//   notice         a `policy_error` event: its payload
//   disconnected   with socket.io-client's reason
//   reconnecting   socket.io-client started a reconnection attempt
//   done
import { io } from "socket.io-client";
import { connectWithPolicy } from "@policy-engine/client";

const [url, ms, kind = "plain"] = process.argv.slice(2);
const log = (event, fields = {}) =>
  process.stdout.write(`${JSON.stringify({ event, t: performance.now(), ...fields })}\n`);

const options = {
  transports: ["websocket"],
  query: { conversation_id: "drained" },
  reconnectionDelay: 100,
  reconnectionDelayMax: 200,
};
function observe(socket) {
  socket.on("connect", () => log("connected", { id: socket.id, uri: socket.io.uri }));
  socket.on("policy_error", (payload) => log("notice", { payload }));
  socket.on("disconnect", (reason) => log("disconnected", { reason }));
  socket.io.on("reconnect_attempt", (attempt) => log("reconnecting", { attempt }));
}

let socket;
if (kind === "helper") {
  socket = await connectWithPolicy(
    (target, opts) => {
      const created = io(target, opts);
      observe(created);
      return created;
    },
    url,
    { socketOptions: options },
  );
} else {
  socket = io(url, options);
  observe(socket);
}
setTimeout(() => {
  socket.close();
  log("done");
}, Number(ms));
