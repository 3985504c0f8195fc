// Type-checked, never run: `tsc --noEmit -p tests/js` (tests/test_js_package.py) checks that
// the package's declarations describe the module as an application uses it, through the
// package name and its `exports`. The `@ts-expect-error` lines must stay errors: they fail
// the check if a declaration ever degrades to `any`.

import { io, type Socket } from "socket.io-client";
import {
  ADVICE_NAMESPACE,
  ConnectionRefused,
  DEFAULT_BACKOFF,
  EventRefused,
  PolicyRefusedError,
  RetryPlan,
  backoffFrom,
  computeDelayMs,
  connectWithPolicy,
  contractPayload,
  emitWithPolicy,
  reconnectionOptions,
  waitAtLeast,
  type Backoff,
  type Payload,
  type RetryInfo,
} from "@policy-engine/client";

export async function chat(url: string): Promise<unknown> {
  const socket: Socket = await connectWithPolicy(io, url, {
    socketOptions: { query: { conversation_id: "c1" }, transports: ["websocket"] },
    maxAttempts: 5,
    onRetry: ({ attempt, delayMs, payload }: RetryInfo) => {
      const code: string | undefined = payload?.code;
      console.info(attempt, delayMs, code);
    },
    onGiveUp: (error: Error) => console.warn(error.message),
    signal: AbortSignal.timeout(60_000),
  });
  socket.on("policy_error", (body: unknown) => {
    const payload: Payload | null = contractPayload(body);
    if (payload?.retryable) console.info(payload.retry_after_ms);
  });
  try {
    return await emitWithPolicy(socket, "oh_user_action", { action: "run" }, { timeoutMs: 10_000 });
  } catch (error) {
    if (error instanceof EventRefused || error instanceof ConnectionRefused) {
      const refused: PolicyRefusedError = error;
      return refused.code;
    }
    throw error;
  }
}

export function pacing(): number | null {
  const advice: Backoff | null = backoffFrom({ strategy: "constant", base_ms: 1, max_ms: 1, max_attempts: 1 });
  const plan = new RetryPlan({ random: Math.random, maxAttempts: 3 });
  const first: number | null = plan.nextDelayMs(null);
  const options = reconnectionOptions(advice ?? DEFAULT_BACKOFF);
  const delay: number = options.reconnectionDelay;
  void waitAtLeast(delay);
  const namespace: "/policy-engine" = ADVICE_NAMESPACE;
  void namespace;
  return first ?? computeDelayMs(DEFAULT_BACKOFF, 1, Math.random);
}

// @ts-expect-error: the backoff strategy is a closed set
export const wrongStrategy: Backoff = { ...DEFAULT_BACKOFF, strategy: "linear" };
// @ts-expect-error: attempts are numbers
computeDelayMs(DEFAULT_BACKOFF, "1", Math.random);
// @ts-expect-error: connectWithPolicy resolves with what `io` returns, not a string
export const notASocket: Promise<string> = connectWithPolicy(io, "http://x");
