"""The refusal filter: prompt scoring, the streaming run, its report, crash-safe output, shards,
and the Ray Data engine (ray_engine, an optional extra)."""
