"""Run by test_startup_once.py: one start of ``sparse-moe-train`` in this process, counting the
calls of what start-up builds (every module's reference to each function is replaced)."""

import json
import sys
from collections import Counter


def main(argv: list[str]) -> None:
    import sparse_moe.train.cli as cli
    import sparse_moe.train.trainer  # noqa: F401 - every module that could call them, loaded
    from sparse_moe.train.ds_config import build_ds_config
    from sparse_moe.train.tasks import make_task

    calls: Counter = Counter()

    def counted(function):
        def wrapper(*args, **kwargs):
            calls[function.__name__] += 1
            return function(*args, **kwargs)
        return wrapper

    for original in (build_ds_config, make_task):
        wrapper = counted(original)
        for module in [m for name, m in sys.modules.items() if name.startswith("sparse_moe")]:
            for attribute, value in list(vars(module).items()):
                if value is original:
                    setattr(module, attribute, wrapper)
    status = cli.main(argv)
    print("CALLS " + json.dumps({"status": status, **calls}))


if __name__ == "__main__":
    main(sys.argv[1:])
