"""The global event feed: every task's events numbered in commit order (GET /events, /events/stream)."""
