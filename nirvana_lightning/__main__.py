"""``python -m nirvana_lightning fit --config ...``: a bad setting ends with one clear line and exit status 2."""

import sys

from .cli import main
from .errors import ConfigError

if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:  # names the key, the bad value and the valid choices; no traceback to read
        print(f"nirvana-lightning: error: {err}", file=sys.stderr)
        sys.exit(2)
