"""Crash-safe state of virtletd: sandboxes and containers in SQLite, and their state machine."""
