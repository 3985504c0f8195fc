/**
 * Types of policy-client.mjs: Socket.IO clients that honour a policy-engine server's client
 * contract. The module takes socket.io-client's `io` as an argument, so these types do not
 * depend on socket.io-client's: the socket type is whatever your `io` returns.
 */

/** The `backoff` object of the contract; durations in milliseconds. */
export interface Backoff {
  strategy: "exponential" | "full_jitter" | "equal_jitter" | "decorrelated_jitter" | "constant";
  base_ms: number;
  max_ms: number;
  /** Retries allowed after the first failure. */
  max_attempts: number;
  multiplier: number;
}

/** What a refused connect (`connect_error`'s `err.data`) or event (its ack) carries. */
export interface Payload {
  /** Stable, machine-readable reason, e.g. `RATE_LIMITED`. */
  code: string;
  category: "connection" | "event_processing" | "system" | "client";
  /** Safe to show to a user. */
  message: string;
  retryable: boolean;
  /** Do not retry before this many milliseconds. */
  retry_after_ms: number | null;
  /** How to space further attempts. */
  backoff: Backoff | null;
  /** The rule that decided, `section/name`. */
  policy: string;
  /** Finds the server's log record. */
  correlation_id: string;
  /** A drain's notice: the server URL to reconnect to. */
  reconnect_url?: string;
}

/** Used until the server has advised otherwise, e.g. while it cannot be reached at all. */
export declare const DEFAULT_BACKOFF: Readonly<Backoff>;

/** socket.io-client's own reconnection defaults: how a plain client retries a drop. */
export declare const PLAIN_RECONNECTION: Readonly<{
  delay: number;
  delayMax: number;
  randomization: number;
}>;

/** The namespace whose `refused` event carries the advice of a refusal that closed the session. */
export declare const ADVICE_NAMESPACE: "/policy-engine";
/** The event on `ADVICE_NAMESPACE` that carries that advice. */
export declare const ADVICE_EVENT: "refused";
/** The code of a server's notice that it stops. */
export declare const SERVER_DRAINING: "SERVER_DRAINING";

/** The server refused under its policy; `payload` is what it sent. */
export declare class PolicyRefusedError extends Error {
  constructor(payload: Payload | Record<string, unknown>);
  readonly payload: Payload | Record<string, unknown>;
  readonly code: string | undefined;
}

/** The handshake was refused for good: not retryable, or out of attempts. */
export declare class ConnectionRefused extends PolicyRefusedError {}

/** An event was refused for good: not retryable, or out of attempts. */
export declare class EventRefused extends PolicyRefusedError {}

/** The contract payload in a value (an ack, or `connect_error`'s `err.data`), or `null`. */
export declare function contractPayload(value: unknown): Payload | null;

/** The advice as a valid `Backoff`, or `null` when it is absent or malformed. */
export declare function backoffFrom(advice: unknown): Backoff | null;

/**
 * Milliseconds to wait before retry number `attempt` (1-based), or `null` to give up.
 * @param random uniform in [0, 1)
 * @param previousMs the previous delay, for `decorrelated_jitter`
 */
export declare function computeDelayMs(
  backoff: Backoff,
  attempt: number,
  random: () => number,
  previousMs?: number | null,
): number | null;

/** The waits of one retry sequence, following the server's latest advice. */
export declare class RetryPlan {
  constructor(options?: { random?: () => number; maxAttempts?: number });
  attempt: number;
  backoff: Backoff;
  previousMs: number | null;
  /** `max(retry_after_ms, backoff delay)` for the next attempt, or `null` to give up. */
  nextDelayMs(payload?: Payload | null): number | null;
}

/** Waits at least `ms` milliseconds by the monotonic clock. */
export declare function waitAtLeast(ms: number): Promise<void>;

/** socket.io-client's own reconnection settings closest to the advice. */
export declare function reconnectionOptions(backoff: Backoff): {
  reconnectionDelay: number;
  reconnectionDelayMax: number;
  randomizationFactor: number;
  reconnectionAttempts: number;
};

/** What `onRetry` is told before each wait. */
export interface RetryInfo {
  /** 1-based retry number. */
  attempt: number;
  /** The wait before it. */
  delayMs: number;
  /** The refusal, or `null` when the server was unreachable. */
  payload: Payload | null;
  /** The `connect_error` error, for connects. */
  error?: Error;
}

export interface ConnectOptions {
  /** Passed to `io` (`query`, `auth`, `transports`, ...). */
  socketOptions?: Record<string, unknown>;
  /** At most this many retries, whatever the advice. */
  maxAttempts?: number;
  /** Uniform in [0, 1), for the jitter. */
  random?: () => number;
  /** Waits; `waitAtLeast` by default. */
  sleep?: (ms: number) => Promise<void>;
  /** Called before each wait. */
  onRetry?: (info: RetryInfo) => void;
  /** A later reconnection was refused for good. */
  onGiveUp?: (error: Error) => void;
  /** Stops retrying and closes the socket. */
  signal?: AbortSignal;
}

/**
 * Opens a Socket.IO connection, retrying refused handshakes only as the server advises;
 * resolves with the connected socket, rejects with `ConnectionRefused` when the refusal is
 * final.
 * @param io socket.io-client's `io`
 */
export declare function connectWithPolicy<S>(
  io: (url: string, options: Record<string, unknown>) => S,
  url: string,
  options?: ConnectOptions,
): Promise<S>;

export interface EmitOptions {
  /** Per attempt; 10 s by default. */
  timeoutMs?: number;
  /** At most this many retries, whatever the advice. */
  maxAttempts?: number;
  random?: () => number;
  sleep?: (ms: number) => Promise<void>;
  /** Called before each wait. */
  onRetry?: (info: RetryInfo) => void;
}

/** The part of a socket.io-client `Socket` that `emitWithPolicy` uses. */
export interface AckSocket {
  timeout(ms: number): { emitWithAck(event: string, ...args: unknown[]): Promise<unknown> };
}

/**
 * Emits `event` with an acknowledgement and resolves with the ack; a refusal in the ack is
 * retried as the server advises, and rejects with `EventRefused` when it is final.
 */
export declare function emitWithPolicy(
  socket: AckSocket,
  event: string,
  data?: unknown,
  options?: EmitOptions,
): Promise<unknown>;
