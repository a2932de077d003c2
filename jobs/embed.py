"""`ray job submit --working-dir . -- python jobs/embed.py --config configs/local.yaml [flags]`

Joins the cluster the job runs on (RAY_ADDRESS, set by `ray job submit`);
never starts its own. Same flags as `embedpipe embed`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["embed", "--ray-address", os.environ.get("RAY_ADDRESS", "auto"), *sys.argv[1:]]))
