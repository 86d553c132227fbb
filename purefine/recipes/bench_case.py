"""One benchmark case in a fresh process: ``python -m purefine.recipes.bench_case CASE STEPS THREADS``."""

import json
import sys

import torch

from purefine.recipes.bench import run_case

if __name__ == "__main__":
    case, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if threads:
        torch.set_num_threads(threads)
    print(json.dumps(run_case(case, steps)))
