"""The ``policy-engine`` command and the YAML policy-test runner it drives."""
