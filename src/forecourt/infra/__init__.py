"""Infrastructure: database, outbox relay, buses, inbox, idempotency, logging, metrics."""
