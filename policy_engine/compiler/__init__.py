"""From a policy file to an immutable, planned :class:`~policy_engine.language.model.PolicySet`."""

from policy_engine.compiler.pipeline import (
    CompileResult,
    compile_document,
    compile_file,
    compile_text,
)

__all__ = ["CompileResult", "compile_document", "compile_file", "compile_text"]
