"""The packet path: codec, connection table, schedulers, forwarder (pure) and the AF_PACKET engine."""
