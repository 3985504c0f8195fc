// The client side of benchmarks/drain_bench.py: N plain socket.io-client connections (from
// tests/js/node_modules, default reconnection settings, WebSocket) through a load balancer,
// each from its own address (X-Forwarded-For, which the benchmark's policy trusts from
// loopback). Prints JSON lines, `t` in ms since start:
//   all       every client is connected
//   summary   every 250 ms after `all`: connected now, notices (SERVER_DRAINING) read,
//             disconnects seen, reconnects completed
//   back      every client was disconnected (its server stopped) and is connected again
//
// It stops SECONDS after every client was connected, or a second after all were back.
//   node drain_clients.mjs URL COUNT SECONDS [FIRST]
//
// FIRST numbers the clients (their addresses and conversations) from there, so that
// several of these processes side by side are all different clients.

import { createRequire } from "node:module";

const require = createRequire(new URL("../tests/js/package.json", import.meta.url));
const { io } = require("socket.io-client");

const [url, n, seconds, firstArg] = process.argv.slice(2);
const first = Number(firstArg ?? 0);
const total = Number(n);
const start = performance.now();
const now = () => Math.round(performance.now() - start);
const log = (event, fields = {}) =>
  process.stdout.write(`${JSON.stringify({ event, t: now(), ...fields })}\n`);

let connected = 0;
let notices = 0;
let disconnects = 0;
let reconnects = 0;
let moved = 0; // clients connected again after their first disconnect
let everyone = false;
let backLogged = false;
const sockets = [];
for (let k = 0; k < total; k += 1) {
  const i = first + k;
  const socket = io(url, {
    transports: ["websocket"],
    forceNew: true,
    timeout: 60_000,
    query: { conversation_id: `drain-${i % 100}` },
    extraHeaders: { "x-forwarded-for": `10.${(i >> 16) & 255}.${(i >> 8) & 255}.${i & 255}` },
  });
  let up = false;
  let wasDown = false;
  let movedOnce = false;
  socket.on("connect", () => {
    up = true;
    connected += 1;
    if (wasDown) {
      reconnects += 1;
      if (!movedOnce) {
        movedOnce = true;
        moved += 1;
      }
    }
    if (connected === total && !everyone) {
      everyone = true;
      log("all");
    }
    if (moved === total && connected === total && !backLogged) {
      backLogged = true;
      log("back", { reconnects });
    }
  });
  socket.on("policy_error", (payload) => {
    if (payload?.code === "SERVER_DRAINING") notices += 1;
  });
  socket.on("disconnect", () => {
    if (!up) return;
    up = false;
    wasDown = true;
    connected -= 1;
    disconnects += 1;
  });
  sockets.push(socket);
}
const ticker = setInterval(() => {
  if (everyone) log("summary", { connected, notices, disconnects, reconnects });
}, 250);
// SECONDS count from the moment every client is connected (opening 10,000 takes a while),
// and the clients stop a second after all of them are back.
const finish = () => {
  clearInterval(ticker);
  log("summary", { connected, notices, disconnects, reconnects });
  for (const socket of sockets) socket.close();
  process.exit(0);
};
const waiting = setInterval(() => {
  if (!everyone) return;
  clearInterval(waiting);
  setTimeout(finish, Number(seconds) * 1000);
}, 50);
const stopWhenBack = setInterval(() => {
  if (backLogged) {
    clearInterval(stopWhenBack);
    setTimeout(finish, 1000);
  }
}, 50);
