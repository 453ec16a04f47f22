"""Outbound webhooks: the transactional outbox (service.py), the dispatcher (jobs.py), the SSRF guard."""
