"""GLB: a global load balancer. Shared core: config, state contract, store, CLI."""

__version__ = "0.1.0"
