"""Alembic environment: delegates to the shared runner (connection handed in by the caller)."""

from forecourt.infra.migrate import run_env

run_env()
