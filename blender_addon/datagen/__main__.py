"""``python -m blender_addon.datagen``: render a procedural scene or a .blend file (see ``render.py``)."""

import sys

from .render import main

sys.exit(main())
