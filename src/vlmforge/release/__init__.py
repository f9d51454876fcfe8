"""Releases of a verified artifact set: publish (staging + rename), card (the model card), tarball
(deterministic write, capped safe_extract), verify (verify_release, SHA256SUMS), hub (push), files (the names
and file list they share), commands (the CLI's `publish` and release `verify`)."""
