"""Headless trainer for NPBG++ / NPBG: ``python -m headless_train <hydra overrides>`` trains or
evaluates; ``python -m headless_train export --checkpoint C --scene DIR --out scene.npbgpp``
writes a NeuralScene bundle for the Blender add-on."""
