"""``python -m headless_train``: see :mod:`headless_train.cli`."""

import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["capture-sfm"]:
        # Before cli's imports (Hydra): pycolmap may live in a separate environment without them.
        from headless_train.capture_sfm import main as capture_sfm_main

        sys.exit(capture_sfm_main(sys.argv[2:]))
    from headless_train.cli import main

    main()
