"""Decisions with no I/O and no Socket.IO: classification, rule groups, the engine, explain."""
