"""What verifying a token costs at connect time, per algorithm.

One ``verify_token`` (header, key choice, signature, claims) for HS256, RS256 (2048-bit)
and ES256 (P-256); PyJWT's own ``jwt.decode`` of the RS256 token as the baseline; and one
whole ``Authenticator.authenticate`` of an RS256 token in the ``Authorization`` header
(extraction, the async verifier, the user claim, the scan for stray tokens). The cases
alternate in small batches, so a noisy neighbour on a shared machine slows them all alike
instead of one.

    python -m benchmarks.auth_bench [--rounds 300] [--batch 20]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from benchmarks.decision_bench import summary
from policy_engine.auth import (
    Authenticator,
    Handshake,
    JwtProvider,
    JwtVerifier,
    JwtVerifierSpec,
    KeySet,
    StaticKeys,
    VerificationKey,
    verify_token,
)

ISSUER = "https://issuer.example"


def token_case(alg: str, private: Any, public: Any) -> tuple[str, Callable[[], None]]:
    now = time.time()
    token = jwt.encode(_claims(now), private, algorithm=alg, headers={"kid": "k1"})
    spec = JwtVerifierSpec(name="idp", algorithms=(alg,), issuer=ISSUER, audiences=("chat",))
    keys = KeySet([VerificationKey(algorithms=frozenset({alg}), material=public, kid="k1")])

    def run() -> None:
        verify_token(token, spec, keys, now)

    return alg, run


def pyjwt_case(private: Any, public: Any) -> tuple[str, Callable[[], None]]:
    """The baseline: PyJWT's own ``jwt.decode`` of the same RS256 token, claims checked."""
    token = jwt.encode(_claims(time.time()), private, algorithm="RS256", headers={"kid": "k1"})

    def run() -> None:
        jwt.decode(token, public, algorithms=["RS256"], audience="chat", issuer=ISSUER)

    return "RS256 jwt.decode", run


def authenticator_case(private: Any, public: Any) -> tuple[str, Callable[[], None]]:
    now = time.time()
    token = jwt.encode(_claims(now), private, algorithm="RS256", headers={"kid": "k1"})
    spec = JwtVerifierSpec(name="idp", algorithms=("RS256",), issuer=ISSUER, audiences=("chat",))
    keys = KeySet([VerificationKey(algorithms=frozenset({"RS256"}), material=public, kid="k1")])
    authenticator = Authenticator([JwtProvider(JwtVerifier(spec, StaticKeys(keys)))])
    handshake = Handshake(
        headers={"authorization": f"Bearer {token}", "user-agent": "bench"},
        query={"EIO": "4", "transport": "websocket"},
        auth={"conversation_id": "c-1"},
    )

    def run() -> None:
        coroutine = authenticator.authenticate(handshake)
        try:
            coroutine.send(None)  # static keys: it completes without suspending
        except StopIteration:
            return
        raise RuntimeError("authenticate suspended")

    return "RS256 authenticate", run


def _claims(now: float) -> dict[str, Any]:
    return {"iss": ISSUER, "aud": "chat", "sub": "user-1", "iat": int(now), "exp": int(now) + 3600}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--batch", type=int, default=20)
    args = parser.parse_args()
    secret = b"s" * 32
    rsa_private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_private = ec.generate_private_key(ec.SECP256R1())
    cases = [
        token_case("HS256", secret, secret),
        token_case("RS256", rsa_private, rsa_private.public_key()),
        token_case("ES256", ec_private, ec_private.public_key()),
        pyjwt_case(rsa_private, rsa_private.public_key()),
        authenticator_case(rsa_private, rsa_private.public_key()),
    ]
    samples: dict[str, list[float]] = {name: [] for name, _ in cases}
    for _ in range(max(1, args.rounds // 10)):  # warm up
        for _, run in cases:
            run()
    for _ in range(args.rounds):
        for name, run in cases:
            started = time.perf_counter()
            for _ in range(args.batch):
                run()
            samples[name].append((time.perf_counter() - started) / args.batch * 1e6)
    print(f"{args.rounds} rounds of {args.batch}, microseconds per verification")
    print(f"{'case':<20} {'median':>8} {'p99':>8}")
    for name, _ in cases:
        median, p99 = summary(samples[name])
        print(f"{name:<20} {median:8.1f} {p99:8.1f}")


if __name__ == "__main__":
    main()
