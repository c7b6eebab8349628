"""Device protocol adapters: each vendor wire protocol → the standard model in edge.drivers."""
