"""The bottom layer: contracts (with the one KV layout), hashing and the module graph. Imports nothing of
vlmforge but `vlmforge.errors` (which moves here with the modules that still import it by that name)."""
