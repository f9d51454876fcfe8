"""What an artifact set is on disk: the manifest (write, read, schema check, `verify_dir` — the one
verification, used by the runtime, `validate` and the release) and the runtime configs the build writes and
the runtime reads (genai_config.json, runtime_config.json, processor_config.json)."""
