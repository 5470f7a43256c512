"""Models: loading, the early-exit forward, prompt rendering, prompt states with a shared-prefix
cache, generation, and the teacher directory that every later step reads."""
