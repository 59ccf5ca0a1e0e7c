"""Run an upstream script exactly as `python SCRIPT ARGS...` would, after seeding its RNGs.

Usage: python launch.py SEED SCRIPT [ARGS...]. The upstream scripts take no seed, and
diffusion samplers draw noise, so without this their outputs differ from run to run.
This file is executed by the upstream repository's own Python (possibly 3.8, without
serec installed), so it uses only the standard library and optional numpy/torch.
"""

import os
import random
import runpy
import sys


def main():
    seed = int(sys.argv[1])
    script = sys.argv[2]
    # What `python SCRIPT` sets up: argv[0] is the script, its folder is sys.path[0].
    sys.argv = [script] + sys.argv[3:]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    random.seed(seed)
    try:
        import numpy
    except ImportError:
        pass
    else:
        numpy.random.seed(seed)
    try:
        import torch
    except ImportError:
        pass
    else:
        torch.manual_seed(seed)  # seeds the CPU and every CUDA device
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
