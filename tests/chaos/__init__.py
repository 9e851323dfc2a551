"""Chaos tests: real ``federation up`` process trees, broken on purpose (issue 13)."""
