"""Throwaway network namespaces with fake providers, a DNS server and an attacker host:
the network `warden demo` shows the agent in, and the only one the kernel tests and
benchmarks send traffic in (DESIGN.md, "Testing rules")."""
