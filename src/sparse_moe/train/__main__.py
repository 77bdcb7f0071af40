import sys

from sparse_moe.train.cli import main

sys.exit(main())
