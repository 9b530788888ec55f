"""``python -m nirvana_lightning fit --config ...``: a bad setting ends with one clear line and exit status 2."""

from .cli import entry

if __name__ == "__main__":
    entry()
