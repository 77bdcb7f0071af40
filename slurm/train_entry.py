"""``sparse_moe.train`` as a script path, for launchers that cannot run a module (``-m``).

DeepSpeed's srun runner (``deepspeed --launcher slurm``) drops ``--module``; it starts this file.
"""

import sys

from sparse_moe.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
