#!/usr/bin/env python3
"""huggingface_hub and newt share one Hugging Face cache (tests/hub_fetch.rs drives this).

  hub_interop.py read KIND REPO_ID FILE...   offline: print "FILE SHA256" for files newt downloaded
  hub_interop.py download KIND REPO_ID        download the repo from $HF_ENDPOINT into the cache

KIND is `model` or `dataset`. The cache is $HF_HUB_CACHE; offline mode comes from the caller's
HF_HUB_OFFLINE.
"""
import hashlib
import sys

from huggingface_hub import hf_hub_download, snapshot_download


def main() -> int:
    mode, kind, repo_id, *files = sys.argv[1:]
    if mode == "read":
        for f in files:
            path = hf_hub_download(repo_id, f, repo_type=kind, local_files_only=True)
            with open(path, "rb") as fh:
                print(f, hashlib.sha256(fh.read()).hexdigest())
        # The whole snapshot resolves offline too (refs/main -> snapshots/<commit>).
        print("snapshot", snapshot_download(repo_id, repo_type=kind, local_files_only=True))
        return 0
    if mode == "download":
        print("snapshot", snapshot_download(repo_id, repo_type=kind))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
