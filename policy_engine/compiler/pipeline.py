"""From a policy file to an immutable :class:`~policy_engine.language.model.PolicySet`.

The compiler runs named stages in order: load (YAML with positions), schema (structure),
then semantics and CEL together (names, references, ranges, expressions), then hashing.
Each stage collects every problem it finds instead of stopping at the first, so an
operator fixes a broken file in one round trip. A file with any error is rejected whole:
dropping bad rules one by one would silently change what is enforced.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import fastjsonschema
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from policy_engine import cel
from policy_engine.cel.analysis import conjuncts, event_name_filter, field_path, names_read
from policy_engine.errors import (
    Diagnostic,
    Location,
    PolicyError,
    Severity,
    UnitError,
    did_you_mean,
)
from policy_engine.language.contexts import (
    BREAKER_MATCH_VARIABLES,
    BREAKER_RECORD_VARIABLES,
    HOOK_VARIABLES,
    LOAD,
    PRIORITY_VARIABLES,
    Hook,
    Variable,
)
from policy_engine.language.model import (
    AuthFailureSpec,
    AuthorizationSpec,
    AuthzRuleSpec,
    BackoffSpec,
    BackoffStrategy,
    Category,
    CircuitBreakerSpec,
    ConnectionsSpec,
    DefaultsSpec,
    Effect,
    ErrorRuleSpec,
    ErrorSeverity,
    EvalFailureMode,
    EventSpec,
    Expression,
    IdentitySpec,
    Mode,
    OutboundSpec,
    OverflowAction,
    PolicySet,
    Priority,
    Program,
    RateAlgorithm,
    RateLimitSpec,
    RecoverySpec,
    Scope,
    ShedAction,
    SheddingRuleSpec,
    SlowCallSpec,
    StoreFailureMode,
    WindowSpec,
)
from policy_engine.language.schema import validate_document
from policy_engine.language.source import SourceDocument, load_source, parse_source
from policy_engine.language.units import parse_duration, parse_percent, parse_rate, parse_size

T = TypeVar("T")

# Built in so that every policy can name them; a policy may redefine either.
BUILTIN_BACKOFF: Mapping[str, BackoffSpec] = MappingProxyType(
    {
        "default": BackoffSpec("default", BackoffStrategy.FULL_JITTER, 0.5, 30.0, 10),
        "progressive": BackoffSpec("progressive", BackoffStrategy.EXPONENTIAL, 1.0, 60.0, 10),
    }
)
SLIDING_WINDOW_MAX_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class CompileResult:
    """A compiled policy and the warnings that did not stop it."""

    policy: PolicySet
    warnings: tuple[Diagnostic, ...] = ()


def compile_file(path: str | Path, *, backend: str | None = None) -> CompileResult:
    """Load, validate and compile one policy file; raise PolicyError with every problem."""
    document = load_source(path)
    return compile_document(document, base_dir=Path(path).resolve().parent, backend=backend)


def compile_text(
    text: str | bytes,
    path: str = "<string>",
    *,
    base_dir: Path | None = None,
    backend: str | None = None,
) -> CompileResult:
    document = parse_source(text, path)
    return compile_document(document, base_dir=base_dir or Path.cwd(), backend=backend)


def compile_document(
    document: SourceDocument, *, base_dir: Path, backend: str | None = None
) -> CompileResult:
    schema_problems = validate_document(document)
    if schema_problems:
        raise PolicyError(tuple(sorted(schema_problems, key=Diagnostic.sort_key)))
    compiler = _Compiler(document, base_dir, cel.get_backend(backend))
    policy = compiler.build()
    errors = [d for d in compiler.diagnostics if d.severity is Severity.ERROR]
    ordered = tuple(sorted(compiler.diagnostics, key=Diagnostic.sort_key))
    if errors or policy is None:
        raise PolicyError(ordered)
    return CompileResult(policy, ordered)


@dataclass
class _Compiler:
    """One compilation: the document, where relative paths resolve, and what went wrong."""

    document: SourceDocument
    base_dir: Path
    backend: cel.CelBackend
    diagnostics: list[Diagnostic] = field(default_factory=list)
    rule_names: dict[str, str] = field(default_factory=dict)
    event_schemas: dict[str, Any] = field(default_factory=dict)

    # -- reporting -------------------------------------------------------------------------

    def error(
        self, pointer: str, code: str, message: str, hint: str = "", *, key: bool = False
    ) -> None:
        location = self.document.locate(pointer, key=key)
        self.diagnostics.append(Diagnostic(location, code, message, hint))

    def warn(self, pointer: str, code: str, message: str, hint: str = "") -> None:
        location = self.document.locate(pointer)
        self.diagnostics.append(Diagnostic(location, code, message, hint, Severity.WARNING))

    def unit(self, parse: Callable[[Any], T], value: Any, pointer: str, fallback: T) -> T:
        try:
            return parse(value)
        except UnitError as exc:
            self.error(pointer, "unit", str(exc))
            return fallback

    # -- expressions -----------------------------------------------------------------------

    def expression(
        self,
        source: str,
        pointer: str,
        variables: Mapping[str, Variable],
        context: str,
        expect: str = "bool",
    ) -> Expression | None:
        try:
            program = self.backend.compile(source, variables, expect=expect)
        except cel.CelCompileError as exc:
            line, column = self._expression_position(pointer, source, exc.offset)
            location = Location(self.document.path, line, column, pointer)
            available = ", ".join(sorted(variables))
            hint = exc.hint or (
                f"variables available here ({context}): {available}"
                if exc.code == "cel-undeclared"
                else ""
            )
            self.diagnostics.append(Diagnostic(location, exc.code, exc.message, hint))
            return None
        names, rest = event_name_filter(source) if "event" in variables else (None, None)
        residual = None
        if names is not None and rest is not None:
            residual = self.backend.compile(rest, variables, expect=expect)
        return Expression(
            source,
            context,
            program,
            self.document.locate(pointer),
            event_names=names,
            is_name_test=names is not None and rest is None,
            residual=residual,
            path=field_path(source),
            per_connection=program.variables <= _PER_CONNECTION,
        )

    def _expression_position(self, pointer: str, source: str, offset: int) -> tuple[int, int]:
        """Map an offset inside an expression to the file, through quotes and block scalars."""
        location = self.document.locate(pointer)
        lines = self.document.text.splitlines()
        if not 0 < location.line <= len(lines):
            return location.line, location.column
        marker = lines[location.line - 1][location.column - 1 : location.column]
        before = source[:offset]
        if marker in ("|", ">"):
            line = location.line + 1 + before.count("\n")
            if line > len(lines):
                return location.line, location.column
            indent = len(lines[line - 1]) - len(lines[line - 1].lstrip())
            return line, indent + len(before) - (before.rfind("\n") + 1) + 1
        shift = 1 if marker in ('"', "'") else 0
        return location.line, location.column + shift + offset

    # -- names -----------------------------------------------------------------------------

    def claim_name(self, name: str, pointer: str, section: str) -> None:
        previous = self.rule_names.get(name)
        if previous is not None:
            self.error(
                pointer,
                "duplicate-name",
                f"rule name {name!r} is already used by {previous}",
                "rule names identify state across reloads and in metrics: make each unique",
            )
            return
        line = self.document.locate(pointer).line
        self.rule_names[name] = f"{section} (line {line})"

    def mode(self, rule: Mapping[str, Any], defaults: DefaultsSpec) -> Mode:
        return Mode(rule["mode"]) if "mode" in rule else defaults.mode

    # -- the whole policy ------------------------------------------------------------------

    def build(self) -> PolicySet | None:
        data: Mapping[str, Any] = self.document.data
        defaults = self.defaults(data.get("defaults", {}))
        backoff = self.backoff(data.get("backoff", {}))
        self.check_backoff_ref(defaults.backoff, "/defaults/backoff", backoff)
        errors = self.errors(data.get("errors", []), defaults, backoff)
        rate_limits = self.rate_limits(data.get("rate_limits", []), defaults)
        breakers = self.breakers(data.get("circuit_breakers", []), defaults)
        shedding = self.shedding(data.get("shedding", []), defaults)
        connections = self.connections(data.get("connections", {}), backoff)
        recovery = self.recovery(data.get("recovery", {}))
        events, default_event = self.events(data.get("events", {}))
        authorization = self.authorization(data.get("authorization", {}), defaults)
        identity = self.identity(data.get("identity", {}))
        if any(d.severity is Severity.ERROR for d in self.diagnostics):
            return None
        return PolicySet(
            version=self.version(data),
            source=self.document.path,
            defaults=defaults,
            identity=identity,
            errors=errors,
            backoff=backoff,
            rate_limits=rate_limits,
            circuit_breakers=breakers,
            shedding=shedding,
            connections=connections,
            recovery=recovery,
            events=events,
            authorization=authorization,
            default_event=default_event,
        )

    def version(self, data: Mapping[str, Any]) -> str:
        """The content hash: the document as data plus every event schema it references."""
        canonical = json.dumps(
            {"policy": data, "schemas": self.event_schemas},
            sort_keys=True,
            separators=(",", ":"),
            default=str,
        )
        return hashlib.sha256(canonical.encode()).hexdigest()

    # -- sections --------------------------------------------------------------------------

    def defaults(self, raw: Mapping[str, Any]) -> DefaultsSpec:
        return DefaultsSpec(
            mode=Mode(raw.get("mode", "enforce")),
            on_store_error=StoreFailureMode(raw.get("on_store_error", "fail_open")),
            store_timeout=self.unit(
                parse_duration, raw.get("store_timeout", "20ms"), "/defaults/store_timeout", 0.02
            ),
            on_eval_error=EvalFailureMode(raw.get("on_eval_error", "fail_open")),
            backoff=raw.get("backoff", "default"),
        )

    def identity(self, raw: Mapping[str, Any]) -> IdentitySpec:
        proxies = tuple(raw.get("trusted_proxies", ()))
        for index, network in enumerate(proxies):
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                self.error(
                    f"/identity/trusted_proxies/{index}",
                    "bad-network",
                    f"{network!r} is not an IP network",
                    "write an address or a CIDR block, for example 10.0.0.0/8",
                )
        return IdentitySpec(
            trusted_proxies=proxies,
            user_claim=raw.get("user_claim", "sub"),
            user_param=raw.get("user_param", "user_id"),
            conversation_param=raw.get("conversation_param", "conversation_id"),
            token_param=raw.get("token_param", "token"),
        )

    def backoff(self, raw: Mapping[str, Any]) -> Mapping[str, BackoffSpec]:
        policies = dict(BUILTIN_BACKOFF)
        for name, body in raw.items():
            pointer = f"/backoff/{name}"
            base = self.unit(parse_duration, body.get("base", "500ms"), f"{pointer}/base", 0.5)
            cap = self.unit(parse_duration, body.get("max", "30s"), f"{pointer}/max", 30.0)
            if base <= 0:
                self.error(f"{pointer}/base", "out-of-range", "backoff base must be above zero")
            if cap < base:
                self.error(
                    f"{pointer}/max",
                    "out-of-range",
                    f"backoff max ({body.get('max')}) is below its base ({body.get('base')})",
                )
            policies[name] = BackoffSpec(
                name,
                BackoffStrategy(body.get("strategy", "full_jitter")),
                base,
                cap,
                int(body.get("max_attempts", 10)),
                float(body.get("multiplier", 2.0)),
            )
        return MappingProxyType(policies)

    def check_backoff_ref(self, name: str, pointer: str, backoff: Mapping[str, Any]) -> None:
        if name not in backoff:
            self.error(
                pointer,
                "unknown-backoff",
                f"backoff policy {name!r} is not defined",
                did_you_mean(name, list(backoff), "define it under `backoff:`"),
            )

    def errors(
        self,
        raw: list[Mapping[str, Any]],
        defaults: DefaultsSpec,
        backoff: Mapping[str, BackoffSpec],
    ) -> tuple[ErrorRuleSpec, ...]:
        rules: list[ErrorRuleSpec] = []
        catch_all: str | None = None
        for index, body in enumerate(raw):
            pointer = f"/errors/{index}"
            name = body["name"]
            self.claim_name(name, f"{pointer}/name", "errors")
            if catch_all is not None:
                self.warn(
                    f"{pointer}/when",
                    "unreachable-rule",
                    f"error rule {name!r} is never reached: {catch_all} matches every error first",
                    "move the catch-all rule to the end of `errors:`",
                )
            when = self.expression(
                body["when"], f"{pointer}/when", HOOK_VARIABLES[Hook.ERROR], "errors"
            )
            if _is_catch_all(body["when"]) and catch_all is None:
                catch_all = f"rule {name!r} (line {self.document.locate(pointer).line})"
            backoff_name = body.get("backoff", defaults.backoff)
            if "backoff" in body:
                self.check_backoff_ref(backoff_name, f"{pointer}/backoff", backoff)
            retry_after = body.get("retry_after")
            if when is None:
                continue
            rules.append(
                ErrorRuleSpec(
                    name=name,
                    when=when,
                    category=Category(body["category"]),
                    severity=ErrorSeverity(body.get("severity", "error")),
                    code=body["code"],
                    message=body.get("message", _DEFAULT_MESSAGES[body["category"]]),
                    retryable=bool(body.get("retryable", False)),
                    backoff=backoff_name,
                    retry_after=None
                    if retry_after is None
                    else self.unit(parse_duration, retry_after, f"{pointer}/retry_after", 0.0),
                    alert=bool(body.get("alert", False)),
                    location=self.document.locate(pointer),
                )
            )
        return tuple(rules)

    def rate_limits(
        self, raw: list[Mapping[str, Any]], defaults: DefaultsSpec
    ) -> tuple[RateLimitSpec, ...]:
        rules: list[RateLimitSpec] = []
        for index, body in enumerate(raw):
            pointer = f"/rate_limits/{index}"
            name = body["name"]
            self.claim_name(name, f"{pointer}/name", "rate_limits")
            hook = Hook(body["hook"])
            variables = HOOK_VARIABLES[hook]
            context = f"rate_limits at hook {hook.value}"
            key = self.expression(body["key"], f"{pointer}/key", variables, context, "string")
            when = (
                self.expression(body["when"], f"{pointer}/when", variables, context)
                if "when" in body
                else None
            )
            rate = self.unit(parse_rate, body["limit"], f"{pointer}/limit", None)
            algorithm = RateAlgorithm(body.get("algorithm", "gcra"))
            if rate is None:
                continue
            if algorithm is not RateAlgorithm.GCRA and "burst" in body:
                self.warn(
                    f"{pointer}/burst",
                    "ignored-burst",
                    f"burst applies to the gcra algorithm only; {algorithm.value} ignores it",
                )
            if algorithm is RateAlgorithm.SLIDING_WINDOW and rate.limit > SLIDING_WINDOW_MAX_LIMIT:
                self.error(
                    f"{pointer}/limit",
                    "out-of-range",
                    f"sliding_window keeps one timestamp per request: at most "
                    f"{SLIDING_WINDOW_MAX_LIMIT} per window, got {rate.limit}",
                    "use algorithm gcra for large limits",
                )
            if key is None or ("when" in body and when is None):
                continue
            rules.append(
                RateLimitSpec(
                    name=name,
                    hook=hook,
                    key=key,
                    rate=rate,
                    burst=int(body.get("burst", rate.limit)),
                    algorithm=algorithm,
                    scope=Scope(body.get("scope", "global")),
                    mode=self.mode(body, defaults),
                    when=when,
                    code=body.get("code", "RATE_LIMITED"),
                    message=body.get("message", "Too many requests; slow down."),
                    max_keys=int(body.get("max_keys", 100_000)),
                    key_label=bool(body.get("key_label", False)),
                    location=self.document.locate(pointer),
                )
            )
        return tuple(rules)

    def breakers(
        self, raw: list[Mapping[str, Any]], defaults: DefaultsSpec
    ) -> tuple[CircuitBreakerSpec, ...]:
        rules: list[CircuitBreakerSpec] = []
        for index, body in enumerate(raw):
            pointer = f"/circuit_breakers/{index}"
            name = body["name"]
            self.claim_name(name, f"{pointer}/name", "circuit_breakers")
            match = self.expression(
                body["match"], f"{pointer}/match", BREAKER_MATCH_VARIABLES, "circuit_breakers.match"
            )
            record_when = (
                self.expression(
                    body["record_when"],
                    f"{pointer}/record_when",
                    BREAKER_RECORD_VARIABLES,
                    "circuit_breakers.record_when",
                )
                if "record_when" in body
                else None
            )
            window_raw = body.get("window", {"calls": 100})
            window = (
                WindowSpec(calls=int(window_raw["calls"]))
                if "calls" in window_raw
                else WindowSpec(
                    time=self.unit(
                        parse_duration, window_raw["time"], f"{pointer}/window/time", 60.0
                    )
                )
            )
            minimum_calls = int(body.get("minimum_calls", 100))
            if window.calls is not None and minimum_calls > window.calls:
                self.error(
                    f"{pointer}/minimum_calls",
                    "out-of-range",
                    f"minimum_calls ({minimum_calls}) exceeds the window of {window.calls} calls: "
                    "the breaker could never open",
                    f"lower minimum_calls to at most {window.calls}",
                )
            if window.time is not None and window.time < 1:
                self.error(f"{pointer}/window/time", "out-of-range", "a time window is at least 1s")
            slow_raw = body.get("slow_call")
            slow = (
                SlowCallSpec(
                    self.unit(parse_duration, slow_raw["over"], f"{pointer}/slow_call/over", 1.0),
                    self.unit(
                        parse_percent,
                        slow_raw.get("rate", "100%"),
                        f"{pointer}/slow_call/rate",
                        1.0,
                    ),
                )
                if slow_raw
                else None
            )
            failure_rate = self.unit(
                parse_percent, body.get("failure_rate", "50%"), f"{pointer}/failure_rate", 0.5
            )
            if failure_rate == 0:
                self.error(
                    f"{pointer}/failure_rate",
                    "out-of-range",
                    "a failure_rate of 0% opens the breaker on every call",
                )
            if match is None or ("record_when" in body and record_when is None):
                continue
            rules.append(
                CircuitBreakerSpec(
                    name=name,
                    match=match,
                    failure_rate=failure_rate,
                    window=window,
                    minimum_calls=minimum_calls,
                    open_for=self.unit(
                        parse_duration, body.get("open_for", "60s"), f"{pointer}/open_for", 60.0
                    ),
                    half_open_calls=int(body.get("half_open_calls", 10)),
                    mode=self.mode(body, defaults),
                    record_when=record_when,
                    slow_call=slow,
                    code=body.get("code", "SERVICE_UNAVAILABLE"),
                    message=body.get(
                        "message", "The service is temporarily unavailable; retry later."
                    ),
                    fallback=MappingProxyType(dict(body["fallback"]))
                    if "fallback" in body
                    else None,
                    location=self.document.locate(pointer),
                )
            )
        return tuple(rules)

    def shedding(
        self, raw: list[Mapping[str, Any]], defaults: DefaultsSpec
    ) -> tuple[SheddingRuleSpec, ...]:
        rules: list[SheddingRuleSpec] = []
        for index, body in enumerate(raw):
            pointer = f"/shedding/{index}"
            name = body["name"]
            self.claim_name(name, f"{pointer}/name", "shedding")
            action = ShedAction(body["action"])
            hook = self.shed_hook(body, action, pointer)
            variables = HOOK_VARIABLES[hook] if hook else {"load": LOAD}
            context = f"shedding at hook {hook.value}" if hook else "shedding (disconnect)"
            when = self.expression(body["when"], f"{pointer}/when", variables, context)
            if action is ShedAction.DELAY and "delay" not in body:
                self.error(
                    pointer, "missing-key", "action delay needs `delay:` (how long to hold events)"
                )
            if when is None:
                continue
            rules.append(
                SheddingRuleSpec(
                    name=name,
                    hook=hook,
                    when=when,
                    action=action,
                    mode=self.mode(body, defaults),
                    retry_after=self.unit(
                        parse_duration, body.get("retry_after", "5s"), f"{pointer}/retry_after", 5.0
                    ),
                    delay=self.unit(
                        parse_duration, body.get("delay", "0s"), f"{pointer}/delay", 0.0
                    ),
                    sustained_for=self.unit(
                        parse_duration,
                        body.get("sustained_for", "0s"),
                        f"{pointer}/sustained_for",
                        0.0,
                    ),
                    max_priority=Priority(body.get("max_priority", "low")),
                    max_disconnects=int(body.get("max_disconnects", 10)),
                    code=body.get("code", "OVERLOADED"),
                    message=body.get("message", "The server is overloaded; retry later."),
                    location=self.document.locate(pointer),
                    load_gate=self.load_gate(when, variables),
                )
            )
        return tuple(rules)

    def load_gate(
        self, when: Expression, variables: Mapping[str, Variable]
    ) -> cel.CompiledProgram | Program | None:
        """The operands of a shedding condition that read only ``load``, as one program.

        While they are false the whole condition is false (``&&`` needs every operand, and
        CEL's ``false && error`` is false), so the engine evaluates them once per load
        sample rather than the whole condition once per event. A condition that reads only
        ``load`` is its own gate. Which operands read only ``load`` is read off their text,
        and the gate, made of operands of a checked condition, is not checked again:
        validating a policy costs next to nothing more for it.
        """
        parts = conjuncts(when.source) or [when.source]
        gate = [part for part in parts if names_read(part) <= _LOAD_ONLY]
        if not gate:
            return None
        if len(gate) == len(parts):
            return when.program
        source = " && ".join(f"({part})" for part in gate)
        fast = cel.checked_fast_program(source, variables, _LOAD_ONLY, self.backend)
        if fast is not None:
            return fast
        try:
            return self.backend.compile(source, variables, expect="bool")
        except cel.CelCompileError:
            return None

    def shed_hook(self, body: Mapping[str, Any], action: ShedAction, pointer: str) -> Hook | None:
        """Which hook a shedding action can act at: refusing needs a connect, dropping an event."""
        if action is ShedAction.DISCONNECT:
            if "hook" in body:
                self.warn(
                    f"{pointer}/hook",
                    "ignored-hook",
                    "action disconnect runs on the load sampler's tick; `hook` is ignored",
                )
            return None
        if "hook" not in body:
            self.error(pointer, "missing-key", f"action {action.value} needs `hook:`", key=True)
            return None
        hook = Hook(body["hook"])
        allowed = {ShedAction.REJECT: {Hook.CONNECT}, ShedAction.DROP: {Hook.EVENT, Hook.EMIT}}
        allowed[ShedAction.DELAY] = allowed[ShedAction.DROP]
        if hook not in allowed[action]:
            names = " or ".join(sorted(h.value for h in allowed[action]))
            self.error(
                f"{pointer}/hook",
                "bad-hook",
                f"action {action.value} cannot act at hook {hook.value}",
                f"use hook {names}",
            )
        return hook

    def connections(
        self, raw: Mapping[str, Any], backoff: Mapping[str, BackoffSpec]
    ) -> ConnectionsSpec:
        priority = (
            self.expression(
                raw["priority"],
                "/connections/priority",
                PRIORITY_VARIABLES,
                "connections.priority",
                "int",
            )
            if "priority" in raw
            else None
        )
        auth_raw = raw.get("auth_failures")
        auth = None
        if auth_raw is not None:
            auth = AuthFailureSpec(
                threshold=int(auth_raw.get("threshold", 3)),
                window=self.unit(
                    parse_duration,
                    auth_raw.get("window", "15m"),
                    "/connections/auth_failures/window",
                    900.0,
                ),
                backoff=auth_raw.get("backoff", "progressive"),
                block_after=int(auth_raw.get("block_after", 0)),
                codes=tuple(auth_raw.get("codes", ("AUTH_FAILED",))),
            )
            self.check_backoff_ref(auth.backoff, "/connections/auth_failures/backoff", backoff)
            if auth.block_after and auth.block_after <= auth.threshold:
                self.warn(
                    "/connections/auth_failures/block_after",
                    "no-progressive-delay",
                    "block_after is not above threshold: clients are blocked before any delay",
                )
        out_raw = raw.get("outbound", {})
        idle = raw.get("idle_timeout")
        return ConnectionsSpec(
            max_total=raw.get("max_total"),
            max_per_user=raw.get("max_per_user"),
            max_per_ip=raw.get("max_per_ip"),
            idle_timeout=None
            if idle is None
            else self.unit(parse_duration, idle, "/connections/idle_timeout", None),
            priority=priority,
            auth_failures=auth,
            outbound=OutboundSpec(
                max_queue=int(out_raw.get("max_queue", 1000)),
                on_overflow=OverflowAction(out_raw.get("on_overflow", "drop_lowest")),
                disconnect_after_drops=int(out_raw.get("disconnect_after_drops", 100)),
            ),
            retry_after=self.unit(
                parse_duration, raw.get("retry_after", "5s"), "/connections/retry_after", 5.0
            ),
        )

    def recovery(self, raw: Mapping[str, Any]) -> RecoverySpec:
        return RecoverySpec(
            enabled=bool(raw.get("enabled", True)),
            max_disconnection=self.unit(
                parse_duration,
                raw.get("max_disconnection", "2m"),
                "/recovery/max_disconnection",
                120.0,
            ),
            buffer_events=int(raw.get("buffer_events", 500)),
            events=tuple(raw.get("events", ("oh_event",))),
        )

    def events(self, raw: Mapping[str, Any]) -> tuple[Mapping[str, EventSpec], EventSpec]:
        specs: dict[str, EventSpec] = {}
        for name, body in raw.items():
            pointer = "/events/" + name.replace("~", "~0").replace("/", "~1")
            schema_path = body.get("schema")
            schema, validate = (None, None)
            if schema_path is not None:
                schema, validate = self.event_schema(schema_path, f"{pointer}/schema")
            max_bytes = body.get("max_bytes")
            specs[name] = EventSpec(
                name=name,
                max_bytes=None
                if max_bytes is None
                else self.unit(parse_size, max_bytes, f"{pointer}/max_bytes", 0),
                priority=Priority(body.get("priority", "normal")),
                schema_path=schema_path,
                schema=schema,
                validate=validate,
            )
        default = specs.pop("*", EventSpec("*"))
        return MappingProxyType(specs), default

    def event_schema(self, relative: str, pointer: str) -> tuple[Any, Any]:
        path = (self.base_dir / relative).resolve()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            self.error(
                pointer,
                "missing-file",
                f"event schema {relative!r} cannot be read: {exc.strerror or exc}",
                f"paths are relative to the policy file's folder ({self.base_dir})",
            )
            return None, None
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as exc:
            self.error(
                pointer,
                "bad-event-schema",
                f"event schema {relative!r} is not JSON: {exc.msg} at line {exc.lineno}",
            )
            return None, None
        try:
            Draft202012Validator.check_schema(schema)
            validate = fastjsonschema.compile(schema)
        except (SchemaError, fastjsonschema.JsonSchemaDefinitionException) as exc:
            message = getattr(exc, "message", str(exc))
            self.error(
                pointer,
                "bad-event-schema",
                f"event schema {relative!r} is not a valid JSON Schema: {message}",
            )
            return None, None
        self.event_schemas[relative] = schema
        return MappingProxyType(schema) if isinstance(schema, dict) else schema, validate

    def authorization(self, raw: Mapping[str, Any], defaults: DefaultsSpec) -> AuthorizationSpec:
        rules: list[AuthzRuleSpec] = []
        catch_all: dict[Hook, str] = {}
        for index, body in enumerate(raw.get("rules", [])):
            pointer = f"/authorization/rules/{index}"
            name = body["name"]
            self.claim_name(name, f"{pointer}/name", "authorization")
            hook = Hook(body["hook"])
            if hook in catch_all:
                self.warn(
                    f"{pointer}/when",
                    "unreachable-rule",
                    f"authorization rule {name!r} is never reached: {catch_all[hook]} "
                    f"decides every {hook.value} first",
                )
            when = self.expression(
                body["when"],
                f"{pointer}/when",
                HOOK_VARIABLES[hook],
                f"authorization at hook {hook.value}",
            )
            if _is_catch_all(body["when"]) and hook not in catch_all:
                catch_all[hook] = f"rule {name!r} (line {self.document.locate(pointer).line})"
            if when is None:
                continue
            rules.append(
                AuthzRuleSpec(
                    name=name,
                    hook=hook,
                    when=when,
                    effect=Effect(body["effect"]),
                    mode=self.mode(body, defaults),
                    code=body.get("code", "FORBIDDEN"),
                    message=body.get("message", "Not allowed."),
                    location=self.document.locate(pointer),
                )
            )
        return AuthorizationSpec(Effect(raw.get("default", "allow")), tuple(rules))


_PER_CONNECTION = frozenset({"conn", "claims"})
_LOAD_ONLY = frozenset({"load"})

_DEFAULT_MESSAGES = {
    "connection": "The connection could not be established.",
    "event_processing": "The event could not be processed.",
    "system": "An internal error occurred; retry later.",
    "client": "The request was invalid.",
}


def _is_catch_all(source: str) -> bool:
    return source.strip() == "true"
