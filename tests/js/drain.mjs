// A plain socket.io-client (no helper) through a server's drain: `node drain.mjs <url> <ms>`.
// It connects with socket.io-client's own reconnection (short delays, to keep the test
// short), then prints one JSON line per thing it sees for <ms> milliseconds:
//   connected      the namespace connect was accepted (again, after a reconnect)
//   notice         a `policy_error` event: its payload
//   disconnected   with socket.io-client's reason
//   reconnecting   socket.io-client started a reconnection attempt
//   done
import { io } from "socket.io-client";

const [url, ms] = process.argv.slice(2);
const log = (event, fields = {}) =>
  process.stdout.write(`${JSON.stringify({ event, t: performance.now(), ...fields })}\n`);

const socket = io(url, {
  transports: ["websocket"],
  query: { conversation_id: "drained" },
  reconnectionDelay: 100,
  reconnectionDelayMax: 200,
});
socket.on("connect", () => log("connected", { id: socket.id }));
socket.on("policy_error", (payload) => log("notice", { payload }));
socket.on("disconnect", (reason) => log("disconnected", { reason }));
socket.io.on("reconnect_attempt", (attempt) => log("reconnecting", { attempt }));
setTimeout(() => {
  socket.close();
  log("done");
}, Number(ms));
