"""The build: a plan of nodes (plan.py: exports, transforms, runtime configs, validation, manifest), one
executor that runs them from or into the stage cache (execute.py, cache.py), the node bodies (nodes.py),
and the folders a set is written in and published from (publish_dir.py); run.py ties them together.

    from vlmforge.build import run_build, cache_keys
"""

from vlmforge.build.nodes import (RUNTIME_FILES, STAGE_READS, StageOptions, load_config_ids, source_config_sha256,
                                  stage_options, validation_images)
from vlmforge.build.plan import load_hf_config, precision_contract
from vlmforge.build.publish_dir import FAILED_MARKER, LOGS, VALIDATION_FILE, WORK_DIR, artifact_dir, check_replaceable
from vlmforge.build.run import BuildReport, cache_keys, check_target, run_build

__all__ = ["BuildReport", "FAILED_MARKER", "LOGS", "RUNTIME_FILES", "STAGE_READS", "StageOptions", "VALIDATION_FILE",
           "WORK_DIR", "artifact_dir", "cache_keys", "check_replaceable", "check_target", "load_config_ids",
           "load_hf_config", "precision_contract", "run_build", "source_config_sha256", "stage_options",
           "validation_images"]
