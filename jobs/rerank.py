"""Entry point for `ray job submit`: rerank mined pairs with a cross-encoder on the cluster.

    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env configs/runtime_env.yaml -- python jobs/rerank.py --config configs/rerank.yaml [flags]

Joins the cluster the job runs on (RAY_ADDRESS, else 'auto'); never starts
its own. Same flags as `embedpipe rerank`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import job_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(job_main("rerank", sys.argv[1:]))
