"""A deliberately slow (or hung) test model, for fault and stall tests.

It is the tiny random BERT of conftest with modelling code shipped in the
model directory (so it needs `--trust-remote-code`, like any such model):
its forward sleeps `embedpipe_test_delay` seconds whenever it sees more than
one row, which leaves the one-row probe an encoder runs at start-up fast.
Nothing here is passed off as a real model: the tests that use it check
exactly-once delivery and stall handling, not vectors.
"""

from __future__ import annotations

import json
import os
import shutil

MODELING = '''
import time

from transformers import BertModel


class SlowBertModel(BertModel):
    def forward(self, input_ids=None, *args, **kwargs):
        if input_ids is not None and input_ids.shape[0] > 1:
            time.sleep(float(getattr(self.config, "embedpipe_test_delay", 0.0)))
        return super().forward(input_ids, *args, **kwargs)
'''


def make_slow_model(tiny_bert_dir: str, out_dir: str, delay: float) -> str:
    """A copy of `tiny_bert_dir` whose forward sleeps `delay` seconds per batch of 2+ rows."""
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    shutil.copytree(tiny_bert_dir, out_dir)
    with open(os.path.join(out_dir, "modeling_slow.py"), "w") as f:
        f.write(MODELING)
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["auto_map"] = {"AutoModel": "modeling_slow.SlowBertModel"}
    config["embedpipe_test_delay"] = delay
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
    return out_dir
