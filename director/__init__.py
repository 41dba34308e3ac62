"""director: the LVS-style L4 tier of GLB, one per datacenter."""
