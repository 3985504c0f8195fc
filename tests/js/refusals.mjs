// A plain socket.io-client (no helper) against a live server, printing what it went
// through, one JSON object per line: `node refusals.mjs <url> <transports> [query]`.
// tests/test_refusal_retries.py starts the server, changes its state while this runs and
// asserts on the lines. `transports` is comma-separated (`polling,websocket`, `websocket`).
//
// Lines (each with `event` and `t`, milliseconds since start):
//   connect_error  `message`, and `data` when the server refused the namespace connect
//   disconnect     `reason` (a session the server closed before connecting: retried)
//   reconnect_attempt  socket.io-client's own reconnection started an attempt
//   advice         the payload of a refusal that closed the session (read off the manager)
//   connected      the namespace connect was accepted: the run ends
//   stopped        socket.io-client will not retry (a namespace refusal): the run ends
//   timeout        neither within 20 s

import { io } from "socket.io-client";

const [url, transports = "polling,websocket", query = ""] = process.argv.slice(2);
const start = performance.now();
const log = (event, fields = {}) =>
  process.stdout.write(
    `${JSON.stringify({ event, t: Math.round(performance.now() - start), ...fields })}\n`,
  );

const socket = io(url, {
  transports: transports.split(","),
  forceNew: true,
  query: Object.fromEntries(new URLSearchParams(query)),
  // socket.io-client's defaults but quicker, so a test does not wait seconds per retry.
  reconnectionDelay: 100,
  reconnectionDelayMax: 400,
});
socket.io.on("packet", (packet) => {
  if (packet.nsp === "/policy-engine") log("advice", { payload: packet.data[1] });
});
socket.io.on("reconnect_attempt", (attempt) => log("reconnect_attempt", { attempt }));
socket.on("disconnect", (reason) => log("disconnect", { reason }));

const finish = (event, fields) => {
  log(event, fields);
  socket.off("disconnect");
  socket.disconnect();
  clearTimeout(watchdog);
};
const watchdog = setTimeout(() => finish("timeout"), 20_000);

socket.on("connect_error", (error) => {
  log("connect_error", { message: error.message, data: error.data ?? null });
  // socket.io-client stops for good after a namespace refusal (the socket is inactive).
  if (!socket.active) finish("stopped", { code: error.data?.code ?? null });
});
socket.on("connect", () => finish("connected"));
