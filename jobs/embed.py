"""Entry point for `ray job submit`: embed on the cluster the job runs on.

    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env configs/runtime_env.yaml -- python jobs/embed.py --config configs/cluster.yaml [flags]

Joins the cluster (RAY_ADDRESS, which `ray job submit` sets; 'auto' otherwise)
and never starts its own: an unreachable address is a one-line error. Same
flags as `embedpipe embed`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import job_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(job_main("embed", sys.argv[1:]))
