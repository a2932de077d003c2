"""`ray job submit --working-dir . -- python jobs/mine.py --embeddings DIR --output DIR [flags]`

Joins the cluster the job runs on (RAY_ADDRESS); same flags as `embedpipe mine`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["mine", "--ray-address", os.environ.get("RAY_ADDRESS", "auto"), *sys.argv[1:]]))
