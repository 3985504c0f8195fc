/**
 * Socket.IO clients that honour a policy-engine server's client contract.
 *
 * A refusal says whether to retry (`retryable`), how long to wait at least
 * (`retry_after_ms`) and how to spread further attempts (`backoff`). Clients that retry on
 * their own schedule either hammer a server that asked for a pause or give up on one that
 * would have let them in a second later. These helpers wait
 * `max(retry_after_ms, backoff delay)` before every retry, with the same formulas as the
 * server's `policy_engine/algorithms/backoff.py`.
 *
 * The module has no imports: pass socket.io-client's `io` in, so it works with any
 * bundler, from a CDN build in the browser, and in Node.
 *
 * ```js
 * import { io } from "socket.io-client";
 * import { connectWithPolicy, emitWithPolicy } from "./policy-client.mjs";
 *
 * const socket = await connectWithPolicy(io, "https://chat.example", {
 *   socketOptions: { query: { conversation_id: "c1" }, transports: ["websocket"] },
 * });
 * const ack = await emitWithPolicy(socket, "oh_user_action", { action: "run" });
 * ```
 *
 * @module policy-client
 */

/**
 * The `backoff` object of the contract; durations in milliseconds.
 * @typedef {object} Backoff
 * @property {"exponential"|"full_jitter"|"equal_jitter"|"decorrelated_jitter"|"constant"} strategy
 * @property {number} base_ms
 * @property {number} max_ms
 * @property {number} max_attempts retries allowed after the first failure
 * @property {number} multiplier
 */

/**
 * What a refused connect (`connect_error`'s `err.data`) or event (its ack) carries.
 * @typedef {object} Payload
 * @property {string} code stable, machine-readable reason, e.g. `RATE_LIMITED`
 * @property {"connection"|"event_processing"|"system"|"client"} category
 * @property {string} message safe to show to a user
 * @property {boolean} retryable
 * @property {number|null} retry_after_ms do not retry before this many milliseconds
 * @property {Backoff|null} backoff how to space further attempts
 * @property {string} policy the rule that decided, `section/name`
 * @property {string} correlation_id finds the server's log record
 */

/**
 * Used until the server has advised otherwise, e.g. while it cannot be reached at all.
 * @type {Readonly<Backoff>}
 */
export const DEFAULT_BACKOFF = Object.freeze({
  strategy: "full_jitter",
  base_ms: 500,
  max_ms: 30_000,
  max_attempts: 10,
  multiplier: 2,
});

/** socket.io-client's own reconnection defaults: how a plain client retries a drop. */
export const PLAIN_RECONNECTION = Object.freeze({ delay: 1_000, delayMax: 5_000, randomization: 0.5 });

const STRATEGIES = new Set([
  "exponential",
  "full_jitter",
  "equal_jitter",
  "decorrelated_jitter",
  "constant",
]);

/** The server refused under its policy; `payload` is what it sent. */
export class PolicyRefusedError extends Error {
  /** @param {Payload|Record<string, unknown>} payload */
  constructor(payload) {
    super(`${payload.code ?? "REFUSED"}: ${payload.message ?? ""}`);
    this.name = new.target.name;
    /** @type {Payload|Record<string, unknown>} */
    this.payload = payload;
    /** @type {string|undefined} */
    this.code = typeof payload.code === "string" ? payload.code : undefined;
  }
}

/** The handshake was refused for good: not retryable, or out of attempts. */
export class ConnectionRefused extends PolicyRefusedError {}

/** An event was refused for good: not retryable, or out of attempts. */
export class EventRefused extends PolicyRefusedError {}

/** The namespace whose `refused` event carries the advice of a refusal that closed the session. */
export const ADVICE_NAMESPACE = "/policy-engine";

/** The notice of a server that stops: reconnect after `retry_after_ms`, at `reconnect_url`
 * when it has one (a server URL, as given to `io()`). */
export const SERVER_DRAINING = "SERVER_DRAINING";
export const ADVICE_EVENT = "refused";

/**
 * The contract payload in a value (an ack, or `connect_error`'s `err.data`), or `null`.
 * A payload is recognised by its `code` and `policy` keys.
 * @param {unknown} value
 * @returns {Payload|null}
 */
export function contractPayload(value) {
  if (value === null || typeof value !== "object" || Array.isArray(value)) return null;
  return "code" in value && "policy" in value ? /** @type {Payload} */ (value) : null;
}

/**
 * The advice as a valid `Backoff`, or `null`: it crosses the network, so a malformed one is
 * ignored in favour of the last good advice rather than trusted.
 * @param {unknown} advice
 * @returns {Backoff|null}
 */
export function backoffFrom(advice) {
  if (advice === null || typeof advice !== "object") return null;
  const { strategy, base_ms, max_ms, max_attempts, multiplier = 2 } = /** @type {any} */ (advice);
  const finite = (n) => typeof n === "number" && Number.isFinite(n);
  if (!STRATEGIES.has(strategy) || !finite(base_ms) || !finite(max_ms) || !finite(multiplier)) {
    return null;
  }
  if (!Number.isInteger(max_attempts) || base_ms < 0 || max_ms < 0 || max_attempts < 0) {
    return null;
  }
  if (multiplier < 1) return null;
  return { strategy, base_ms, max_ms, max_attempts, multiplier };
}

/**
 * Milliseconds to wait before retry number `attempt` (1-based), or `null` to give up: the
 * formulas of `policy_engine/algorithms/backoff.py` ("Exponential Backoff and Jitter").
 * @param {Backoff} backoff
 * @param {number} attempt
 * @param {() => number} random uniform in [0, 1)
 * @param {number|null} [previousMs] the previous delay, for `decorrelated_jitter`
 * @returns {number|null}
 */
export function computeDelayMs(backoff, attempt, random, previousMs = null) {
  if (attempt < 1) throw new RangeError(`attempts are counted from 1, got ${attempt}`);
  if (attempt > backoff.max_attempts) return null;
  const { strategy, base_ms: base, max_ms: cap, multiplier } = backoff;
  if (strategy === "constant") return Math.min(cap, base);
  if (strategy === "decorrelated_jitter") {
    const prev = previousMs === null || previousMs < base ? base : previousMs;
    return Math.min(cap, base + random() * (3 * prev - base));
  }
  const ceiling = base <= 0 ? 0 : Math.min(cap, base * multiplier ** (attempt - 1));
  if (strategy === "full_jitter") return random() * ceiling;
  if (strategy === "equal_jitter") return ceiling / 2 + (random() * ceiling) / 2;
  return ceiling;
}

/**
 * The waits of one retry sequence, following the server's latest advice. The attempt count
 * runs on when the advice changes, so a client that keeps being refused keeps backing off
 * and finally gives up; failures without advice reuse the last advice.
 */
export class RetryPlan {
  /** @param {{random?: () => number, maxAttempts?: number}} [options] */
  constructor({ random = Math.random, maxAttempts } = {}) {
    this.random = random;
    this.maxAttempts = maxAttempts;
    this.attempt = 0;
    /** @type {Backoff} */
    this.backoff = DEFAULT_BACKOFF;
    /** @type {number|null} */
    this.previousMs = null;
  }

  /**
   * `max(retry_after_ms, backoff delay)` for the next attempt, or `null` to give up.
   * @param {Payload|null} [payload] the refusal, or nothing when the server was unreachable
   * @returns {number|null}
   */
  nextDelayMs(payload = null) {
    if (payload) this.backoff = backoffFrom(payload.backoff) ?? this.backoff;
    this.attempt += 1;
    let backoff = this.backoff;
    if (this.maxAttempts !== undefined && this.maxAttempts < backoff.max_attempts) {
      backoff = { ...backoff, max_attempts: this.maxAttempts };
    }
    const delay = computeDelayMs(backoff, this.attempt, this.random, this.previousMs);
    if (delay === null) return null;
    this.previousMs = delay;
    const after = payload?.retry_after_ms;
    return Math.max(delay, typeof after === "number" && after > 0 ? after : 0);
  }
}

/**
 * Waits at least `ms` milliseconds by the monotonic clock. Timers may fire a little early
 * against `performance.now()` (they count from the event loop's cached time), and a retry
 * before `retry_after_ms` would be refused again.
 * @param {number} ms
 * @returns {Promise<void>}
 */
export async function waitAtLeast(ms) {
  const until = performance.now() + ms;
  for (let left = ms; left > 0; left = until - performance.now()) {
    await new Promise((resolve) => setTimeout(resolve, Math.ceil(left)));
  }
}

/**
 * socket.io-client's own reconnection settings closest to the advice, for dropped
 * connections. Its delay is `min(max, d * 2^n ± r * d * 2^n)`: with `d = base / 2` and
 * `r = 1` that is full jitter's `[0, base * 2^n]`, with `d = 3/4 base` and `r = 1/3` equal
 * jitter's `[base * 2^n / 2, base * 2^n]`. Its factor is always 2, and decorrelated jitter
 * is approximated by full jitter.
 * @param {Backoff} backoff
 * @returns {{reconnectionDelay: number, reconnectionDelayMax: number, randomizationFactor: number, reconnectionAttempts: number}}
 */
export function reconnectionOptions(backoff) {
  const { strategy, base_ms: base, max_ms: max, max_attempts: reconnectionAttempts } = backoff;
  const options = (reconnectionDelay, reconnectionDelayMax, randomizationFactor) => ({
    reconnectionDelay,
    reconnectionDelayMax,
    randomizationFactor,
    reconnectionAttempts,
  });
  switch (strategy) {
    case "full_jitter":
    case "decorrelated_jitter":
      return options(base / 2, max, 1);
    case "equal_jitter":
      return options((base * 3) / 4, max, 1 / 3);
    case "constant":
      return options(Math.min(base, max), Math.min(base, max), 0);
    default:
      return options(base, max, 0);
  }
}

/**
 * @typedef {object} RetryInfo
 * @property {number} attempt 1-based retry number
 * @property {number} delayMs the wait before it
 * @property {Payload|null} payload the refusal, or `null` when the server was unreachable
 * @property {Error} [error] the `connect_error` error, for connects
 */

/**
 * Opens a Socket.IO connection, retrying refused handshakes only as the server advises.
 *
 * The socket is created with `autoConnect: false` and, until the first connect, with
 * socket.io-client's reconnection off: this function schedules every handshake retry itself,
 * after `max(retry_after_ms, backoff delay)`, and rejects with `ConnectionRefused` when a
 * refusal is not retryable or the advice's `max_attempts` are spent. Once connected, the
 * built-in reconnection handles dropped connections, tuned from the last advice
 * (`reconnectionOptions`); a server refusal during such a reconnection, which
 * socket.io-client never retries by itself, is retried here on the same terms and reported
 * to `onGiveUp` when it is final. Pass `reconnection: false` in `socketOptions` to keep the
 * built-in reconnection off after connecting too. A server that stops (`SERVER_DRAINING`)
 * is reconnected after its `retry_after_ms`, at its `reconnect_url` when it names one.
 *
 * Sockets to the same server share one socket.io-client `Manager` unless `forceNew` is set;
 * the advice tunes that Manager, which suits them all: it comes from the same server.
 *
 * @param {(url: string, options: object) => any} io socket.io-client's `io`
 * @param {string} url
 * @param {object} [options]
 * @param {object} [options.socketOptions] passed to `io` (`query`, `auth`, `transports`, ...)
 * @param {number} [options.maxAttempts] at most this many retries, whatever the advice
 * @param {() => number} [options.random] uniform in [0, 1), for the jitter
 * @param {(ms: number) => Promise<void>} [options.sleep] waits; `waitAtLeast` by default
 * @param {(info: RetryInfo) => void} [options.onRetry] called before each wait
 * @param {(error: Error) => void} [options.onGiveUp] a later reconnection was refused for good
 * @param {AbortSignal} [options.signal] stops retrying and closes the socket
 * @returns {Promise<any>} the connected socket
 */
export function connectWithPolicy(io, url, options = {}) {
  const {
    socketOptions = {},
    maxAttempts,
    random = Math.random,
    sleep = waitAtLeast,
    onRetry = () => {},
    onGiveUp = () => {},
    signal,
  } = options;
  const socket = io(url, { ...socketOptions, autoConnect: false, reconnection: false });
  let plan = new RetryPlan({ random, maxAttempts });
  let advice = DEFAULT_BACKOFF;
  let settled = false;

  return new Promise((resolve, reject) => {
    const giveUp = (error) => {
      if (settled) {
        onGiveUp(error);
      } else {
        settled = true;
        reject(error);
      }
    };
    // A dropped connection (the server restarted, the network went) comes with no advice:
    // it is retried as a plain socket.io-client retries it (1 s doubling to 5 s, +-50%, for
    // ever), unless the application set its own reconnection options. Following the
    // refusal advice there (500 ms base, full jitter, 30 s cap, 10 attempts) brought clients
    // back after a restart 1.5-5x later than plain ones: their early retries spent the
    // backoff while the server was still starting.
    const tune = (manager) => {
      manager.reconnectionDelay(socketOptions.reconnectionDelay ?? PLAIN_RECONNECTION.delay);
      manager.reconnectionDelayMax(
        socketOptions.reconnectionDelayMax ?? PLAIN_RECONNECTION.delayMax,
      );
      manager.randomizationFactor(
        socketOptions.randomizationFactor ?? PLAIN_RECONNECTION.randomization,
      );
      manager.reconnectionAttempts(socketOptions.reconnectionAttempts ?? Infinity);
    };
    const abort = () => {
      socket.disconnect();
      giveUp(signal.reason ?? new Error("aborted"));
    };
    if (signal?.aborted) {
      abort();
      return;
    }
    signal?.addEventListener("abort", abort, { once: true });

    socket.on("connect", () => {
      plan = new RetryPlan({ random, maxAttempts }); // a new run of failures starts afresh
      tune(socket.io);
      if (socketOptions.reconnection !== false) socket.io.reconnection(true);
      if (!settled) {
        settled = true;
        resolve(socket);
      }
    });

    // A refusal retrying can fix comes as the server closing the session, after its advice
    // on the advice namespace: socket.io-client's own reconnection retries such a close.
    let sessionAdvice = null;
    socket.io.on("packet", (packet) => {
      if (packet.nsp === ADVICE_NAMESPACE && Array.isArray(packet.data)) {
        const [name, body] = packet.data;
        if (name === ADVICE_EVENT) sessionAdvice = contractPayload(body);
      }
    });
    // A server that stops tells its clients when, and maybe where, to come back.
    let drained = null;
    socket.on("policy_error", (body) => {
      const payload = contractPayload(body);
      if (payload?.code === SERVER_DRAINING) drained = payload;
    });
    socket.on("disconnect", () => {
      if (drained !== null && socket.io.reconnection()) {
        comeBackLater(drained, drained.retry_after_ms ?? 0, 0);
        drained = null;
        return;
      }
      const payload = sessionAdvice;
      sessionAdvice = null;
      if (payload === null) return;
      advice = backoffFrom(payload.backoff) ?? advice;
      if (socket.io.reconnection()) {
        // A refusal that ended the session: its advice, not the plain pace, says when.
        const delayMs = plan.nextDelayMs(payload);
        if (delayMs === null) {
          socket.io.reconnection(false);
          giveUp(new ConnectionRefused(payload));
        } else {
          comeBackLater(payload, delayMs, plan.attempt);
        }
        return;
      }
      retry(payload, new ConnectionRefused(payload));
    });

    socket.on("connect_error", async (error) => {
      // socket.io-client drops a socket the server refused before it reports the refusal;
      // after a transport error the socket stays active.
      const refused = !socket.active;
      const payload = refused ? contractPayload(error?.data) : null;
      if (payload) {
        advice = backoffFrom(payload.backoff) ?? advice;
        tune(socket.io);
      } else if (refused) {
        // Refused by a server that sent no advice: nothing says a retry would help.
        giveUp(new ConnectionRefused({ message: error?.message, data: error?.data }));
        return;
      } else if (socket.io.reconnection()) {
        return; // a transport error while the built-in reconnection is in charge
      }
      await retry(payload, error);
    });

    // Called while socket.io-client's manager handles the close, before it schedules its
    // own reconnection: that is held off, and the connection made again after the advised
    // delay, at the advised address when there is one (a drain's notice).
    const comeBackLater = (payload, delayMs, attempt) => {
      const manager = socket.io;
      manager.reconnection(false);
      if (typeof payload.reconnect_url === "string" && payload.reconnect_url) {
        manager.uri = payload.reconnect_url;
      }
      onRetry({ attempt, delayMs, payload });
      sleep(delayMs).then(() => {
        manager.reconnection(true);
        if (!signal?.aborted && !socket.connected) socket.connect();
      });
    };

    const retry = async (payload, error) => {
      if (payload && payload.retryable !== true) {
        giveUp(new ConnectionRefused(payload));
        return;
      }
      const delayMs = plan.nextDelayMs(payload);
      if (delayMs === null) {
        giveUp(payload ? new ConnectionRefused(payload) : error);
        return;
      }
      onRetry({ attempt: plan.attempt, delayMs, payload, error });
      await sleep(delayMs);
      if (!signal?.aborted && !socket.connected) socket.connect();
    };

    socket.connect();
  });
}

/**
 * Emits `event` with an acknowledgement and resolves with the ack; a refusal in the ack is
 * retried as the server advises.
 *
 * An ack that is a contract payload (it has `code` and `policy`) is a refusal: a retryable
 * one is retried after `max(retry_after_ms, backoff delay)`, up to the advice's
 * `max_attempts`; otherwise the promise rejects with `EventRefused`. A timeout rejects with
 * socket.io-client's own error and is not retried: the handler may have run, and only the
 * application knows whether running it twice is safe.
 *
 * @param {any} socket a connected socket.io-client `Socket`
 * @param {string} event
 * @param {unknown} [data] omitted from the packet when `undefined`
 * @param {object} [options]
 * @param {number} [options.timeoutMs] per attempt; 10 s by default
 * @param {number} [options.maxAttempts] at most this many retries, whatever the advice
 * @param {() => number} [options.random]
 * @param {(ms: number) => Promise<void>} [options.sleep]
 * @param {(info: RetryInfo) => void} [options.onRetry] called before each wait
 * @returns {Promise<unknown>} the ack
 */
export async function emitWithPolicy(socket, event, data, options = {}) {
  const {
    timeoutMs = 10_000,
    maxAttempts,
    random = Math.random,
    sleep = waitAtLeast,
    onRetry = () => {},
  } = options;
  const plan = new RetryPlan({ random, maxAttempts });
  const args = data === undefined ? [] : [data];
  for (;;) {
    const ack = await socket.timeout(timeoutMs).emitWithAck(event, ...args);
    const payload = contractPayload(ack);
    if (!payload) return ack;
    if (payload.retryable !== true) throw new EventRefused(payload);
    const delayMs = plan.nextDelayMs(payload);
    if (delayMs === null) throw new EventRefused(payload);
    onRetry({ attempt: plan.attempt, delayMs, payload });
    await sleep(delayMs);
  }
}
