"""``python -m kernels``: build the compiled extension now (it is otherwise built on first use) and report it.

Exit status 0 when every library built and loaded, 1 otherwise (the build log is printed)."""

import json
import logging
import sys

from kernels import _extension


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="[rlhf-engine] %(message)s")
    ok = _extension.load_all()
    print(json.dumps(_extension.status(), indent=2))
    if not ok:
        print(_extension.extension_error() or f"disabled ({_extension.ENV_BUILD}=0)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
