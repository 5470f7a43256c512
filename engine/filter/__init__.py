"""The refusal filter: prompt scoring, the streaming run, its report, crash-safe output and
shards."""
