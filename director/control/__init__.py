"""The control plane: health checks, site state, publication to Redis, status and admin HTTP, Director."""
