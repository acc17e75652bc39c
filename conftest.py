"""One CPU thread per test process: the models are tiny, so threads add only overhead, and on
a busy machine (or with two DDP ranks on two cores) they spin against each other."""
import os

os.environ["OMP_NUM_THREADS"] = "1"  # also read by the DDP ranks the tests spawn

import torch  # noqa: E402

torch.set_num_threads(1)

# run outputs (out*/) may hold copies of the scripts: the tests are the top-level ones only
collect_ignore_glob = ["out*"]
