"""What a policy is: units, the typed hook contexts, the compiled model and the YAML source.

Nothing here evaluates or enforces anything; every other layer reads these records.
"""
