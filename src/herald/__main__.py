"""``python -m herald``: the ``herald`` command line."""

from herald.cli import main

if __name__ == "__main__":
    main()
