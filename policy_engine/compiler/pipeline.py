"""From a policy file to an immutable :class:`~policy_engine.language.model.PolicySet`.

The compiler runs named stages in order: load (YAML with positions), schema (structure),
sections (one builder per section: names, references, ranges, CEL), hash (the version),
plan (what each decision will visit). Every stage reports every problem it finds, and the
sections stage still reads each part of the file that passed the schema, so an operator
fixes a broken file in one round trip. A file with any error is rejected whole: dropping
bad rules one by one would silently change what is enforced.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policy_engine import cel
from policy_engine.compiler.compilation import Compilation
from policy_engine.compiler.comprehensions import warn_unbounded_comprehensions
from policy_engine.compiler.planner import plan
from policy_engine.compiler.sections import build_sections
from policy_engine.errors import Diagnostic, PolicyError
from policy_engine.language.model import PolicySet
from policy_engine.language.schema import check_document
from policy_engine.language.source import SourceDocument, load_source, parse_source


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
    schema = check_document(document)
    compilation = Compilation(
        document, base_dir, cel.get_backend(backend), schema, list(schema.diagnostics)
    )
    sections = build_sections(compilation)
    warn_unbounded_comprehensions(compilation, sections)
    diagnostics = compilation.report()
    if compilation.failed:
        raise PolicyError(diagnostics)
    version = content_hash(document.data, compilation.event_schemas)
    policy = plan(sections, version=version, source=document.path, backend=compilation.backend)
    return CompileResult(policy, diagnostics)


def content_hash(data: Mapping[str, Any], event_schemas: Mapping[str, Any]) -> str:
    """The policy's version: the document as data plus every event schema it references."""
    canonical = json.dumps(
        {"policy": data, "schemas": event_schemas},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()
