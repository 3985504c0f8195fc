"""``python -m policy_engine``: the same command as ``policy-engine``."""

from policy_engine.cli.main import entry

entry()
