"""`python -m training ...` / `torchrun --nproc_per_node=N -m training ...`: the same options as `effnet train`."""
import sys

from .options import get_args_parser
from .train import run

if __name__ == "__main__":
    sys.exit(run(get_args_parser().parse_args()))
