"""Veeder-Root TLS-3xx/4xx tank gauges (computer format): codec, gauge driver, simulator."""
