"""Device protocol adapters: each vendor wire protocol → the standard model (protocols.model)."""
