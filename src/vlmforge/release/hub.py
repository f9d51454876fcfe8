"""Push a verified release folder to a Hugging Face model repo."""

from __future__ import annotations

import logging
from pathlib import Path

from vlmforge.core.env import hub_offline
from vlmforge.core.errors import ArtifactError
from vlmforge.release.verify import verify_release

log = logging.getLogger(__name__)


def _hub_fix(repo: str) -> str:
    return (f"unset HF_HUB_OFFLINE, make sure this machine reaches huggingface.co and HF_TOKEN may write to {repo}; "
            f"or copy the release folder elsewhere and run `hf upload {repo} RELEASE_DIR .` there")


def check_hub_reachable(repo: str) -> None:
    if hub_offline():
        raise ArtifactError(f"cannot push to the hub repo {repo!r}: HF_HUB_OFFLINE is set (offline mode)",
                            where=f"hub repo {repo}", fix=_hub_fix(repo))


def push_to_hub(release: Path, repo: str, revision: str | None = None) -> str:
    """Upload a release folder to a Hugging Face model repo (created if missing). Returns the commit URL."""
    release = Path(release)
    check_hub_reachable(repo)
    report = verify_release(release)
    if not report.ok:
        raise ArtifactError(f"refusing to push a release that does not verify: {'; '.join(report.lines())}",
                            where=str(release), fix="publish it again with `vlmforge publish`")
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo, repo_type="model", exist_ok=True)
        if revision:
            api.create_branch(repo, branch=revision, repo_type="model", exist_ok=True)
        info = api.upload_folder(repo_id=repo, folder_path=str(release), repo_type="model", revision=revision,
                                 commit_message=f"vlmforge release {release.name}")
    except Exception as exc:  # network, auth, offline, quota: huggingface_hub raises many types; one answer here
        raise ArtifactError(f"could not push {release.name} to the hub repo {repo!r} "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})",
                            where=f"hub repo {repo}", fix=_hub_fix(repo)) from exc
    log.info("pushed %s to %s", release, getattr(info, "commit_url", repo))
    return str(getattr(info, "commit_url", repo))
