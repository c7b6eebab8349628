"""audit: the tamper-evident, hash-chained audit trail (see domain.py)."""
