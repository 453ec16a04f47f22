"""The relay: HTTP client, parsers for each relay dialect, and a fake relay for tests and demos."""
