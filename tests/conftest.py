import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

# The test models are tiny: one thread avoids OpenMP start-up and contention costs
# that dominate such small ops on a 2-core machine (measured: a 2x16x32x32 depthwise
# conv took 50 ms with 2 threads under load vs 0.5 ms with 1).
torch.set_num_threads(1)
