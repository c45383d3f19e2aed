"""``python -m headless_train``: see :mod:`headless_train.cli`."""

from headless_train.cli import main

if __name__ == "__main__":
    main()
