"""Test support shared by all test packages: servers and helpers made for tests, never shipped."""
