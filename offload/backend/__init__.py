"""Redis: publishing (Lua), history reads, the per-worker hub, connection slots.
Depends on the core, never on the transports or the Django edge."""
