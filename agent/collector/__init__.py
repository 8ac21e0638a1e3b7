"""The collector (DESIGN.md "Collector"): many agents in, every event stored exactly once.

store.py opens a store from a URL (SQLite by default, PostgreSQL for a fleet); both keep
events keyed by (agent, seq) and insert idempotently, so a resumed or duplicated stream
never stores an event twice."""
