"""dnsfront: the authoritative DNS tier of GLB."""
