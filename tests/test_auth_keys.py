"""Keys bound to their algorithms, checked when loaded, from files and the environment."""

from __future__ import annotations

import json
from pathlib import Path

import jwt
import pytest
from auth_support import (
    HMAC_SECRET,
    NOW,
    ec_key,
    private_pem,
    public_jwk,
    public_pem,
    rsa_key,
    sign,
)
from cryptography.hazmat.primitives.asymmetric import rsa

from policy_engine.auth import (
    AuthenticationConfigError,
    JwtVerifierSpec,
    KeySet,
    env_keys,
    jwks_file_keys,
    key_from_jwk,
    key_from_pem,
    key_from_secret,
    keyset_from_jwks,
    pem_file_keys,
    verify_token,
)

PUBLIC_ALGS = ("RS256", "PS256", "ES256", "ES384")


def test_an_rsa_key_serves_only_rsa_algorithms() -> None:
    key = key_from_pem(public_pem(rsa_key()), PUBLIC_ALGS)
    assert key.algorithms == {"RS256", "PS256"}


def test_an_ec_key_serves_only_the_algorithm_of_its_curve() -> None:
    assert key_from_pem(public_pem(ec_key()), PUBLIC_ALGS).algorithms == {"ES256"}
    assert key_from_pem(public_pem(ec_key(curve="P-384")), PUBLIC_ALGS).algorithms == {"ES384"}


def test_a_key_that_serves_none_of_the_algorithms_is_refused() -> None:
    with pytest.raises(AuthenticationConfigError, match="EC secp256r1 key cannot verify"):
        key_from_pem(public_pem(ec_key()), ("RS256",))


def test_a_private_key_is_refused() -> None:
    with pytest.raises(AuthenticationConfigError, match="private key"):
        key_from_pem(private_pem(rsa_key()), ("RS256",))


def test_a_short_rsa_key_is_refused() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(AuthenticationConfigError, match="1024 bits"):
        key_from_pem(public_pem(weak), ("RS256",))


def test_an_hmac_secret_must_be_as_long_as_the_hash() -> None:
    with pytest.raises(AuthenticationConfigError, match="at least 32"):
        key_from_secret(b"short", ("HS256",))
    assert key_from_secret(b"k" * 32, ("HS256", "HS512")).algorithms == {"HS256"}


def test_a_pem_is_never_an_hmac_secret() -> None:
    with pytest.raises(AuthenticationConfigError, match="PEM"):
        key_from_secret(public_pem(rsa_key()), ("HS256",))


def test_not_a_pem_is_a_config_error() -> None:
    with pytest.raises(AuthenticationConfigError, match="not a PEM"):
        key_from_pem(b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n", ("RS256",))


def test_keys_with_a_kid_match_only_tokens_naming_it() -> None:
    named = key_from_pem(public_pem(rsa_key(0)), ("RS256",), kid="a")
    other = key_from_pem(public_pem(rsa_key(1)), ("RS256",), kid="b")
    keys = KeySet([named, other])
    assert keys.candidates("a", "RS256") == (named,)
    assert keys.candidates(None, "RS256") == (named, other)
    assert keys.candidates("a", "PS256") == ()
    assert not keys.knows("c")


def test_a_jwk_declaring_alg_is_bound_to_it_alone() -> None:
    jwk = public_jwk(rsa_key(), kid="k1", alg="PS256")
    key = key_from_jwk(jwk, ("RS256", "PS256"), allow_symmetric=False)
    assert key is not None
    assert (key.kid, key.algorithms) == ("k1", {"PS256"})


def test_a_jwks_skips_keys_it_cannot_use() -> None:
    document = {
        "keys": [
            {**public_jwk(rsa_key(), kid="enc", alg="RS256"), "use": "enc"},
            {"kty": "oct", "k": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI", "kid": "oct"},
            {"kty": "unknown", "kid": "odd"},
            "not a key",
            public_jwk(ec_key(), kid="ec", alg="ES256"),
            public_jwk(rsa_key(), kid="rsa", alg="RS256"),
        ]
    }
    keys = keyset_from_jwks(document, ("RS256",))
    assert [key.kid for key in keys.keys] == ["rsa"]


@pytest.mark.parametrize("document", [{"keys": []}, {"keys": "no"}, [], {"nokeys": 1}])
def test_a_jwks_without_a_usable_key_is_an_error(document: object) -> None:
    with pytest.raises(AuthenticationConfigError):
        keyset_from_jwks(document, ("RS256",))


def test_a_pem_file_source(tmp_path: Path) -> None:
    path = tmp_path / "idp.pem"
    path.write_bytes(public_pem(ec_key()))
    source = pem_file_keys(path, ("ES256",), kid="2024")
    assert [key.kid for key in source.keys.keys] == ["2024"]
    with pytest.raises(AuthenticationConfigError, match=r"missing\.pem"):
        pem_file_keys(tmp_path / "missing.pem", ("ES256",))


def test_a_jwks_file_may_hold_hmac_keys(tmp_path: Path) -> None:
    secret_jwk = json.loads(jwt.get_algorithm_by_name("HS256").to_jwk(HMAC_SECRET))
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{**secret_jwk, "kid": "s1"}]}))
    keys = jwks_file_keys(path, ("HS256",)).keys
    spec = JwtVerifierSpec(name="local", algorithms=("HS256",))
    assert verify_token(sign(HMAC_SECRET, "HS256", kid="s1"), spec, keys, NOW).key_id == "s1"
    path.write_text("{not json")
    with pytest.raises(AuthenticationConfigError, match="not JSON"):
        jwks_file_keys(path, ("HS256",))


def test_an_environment_variable_holds_a_secret_or_a_pem_as_the_algorithms_say() -> None:
    environ = {"SECRET": "s" * 32, "PEM": public_pem(rsa_key()).decode()}
    assert env_keys("SECRET", ("HS256",), environ=environ).keys.keys[0].material == b"s" * 32
    assert env_keys("PEM", ("RS256",), environ=environ).keys.keys[0].algorithms == {"RS256"}
    with pytest.raises(AuthenticationConfigError, match="PEM"):
        env_keys("PEM", ("HS256",), environ=environ)
    with pytest.raises(AuthenticationConfigError, match="not set"):
        env_keys("ABSENT", ("HS256",), environ=environ)
