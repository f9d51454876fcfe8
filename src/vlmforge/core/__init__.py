"""The bottom layer: errors, paths (confinement, O_NOFOLLOW reads), hashing (the one file hash), contracts
(with the one KV layout) and the module graph. Imports nothing of vlmforge outside `vlmforge.core`."""
