"""The in-path DNS proxy: DNS-aware allowlists that answer only names a workload may reach
(wire.py: the DNS format; names.py: fqdn rules; proxy.py: the proxy and its allow-map writes)."""
