"""The stage cache lives in `vlmforge.build.cache`; this name stays so that existing importers keep working."""

from vlmforge.build.cache import (CACHE_TEMP, ENTRY, FORMAT, Corrupted, Entry, StageCache, _host, digest,  # noqa: F401
                                  owner_tag, pid_alive, read_entry, remove_stale, tag_is_stale)
