"""The scene's colour management against the network's colours (no bpy import: attribute access only).

The engine writes the network's display-sRGB output as scene-linear values (frames.py), which
Blender shows and saves unchanged only when its view transform is Standard (or Raw) with no
look, exposure 0, gamma 1, no curves or white balance, on an sRGB display. Blender 5's
default, AgX, tone-maps them (up to 125/255 apart in 8 bits, BLENDER-NOTES.md): the photos'
colours come out desaturated. Imports that set a scene up for neural rendering therefore
switch to Standard (saying so); renders only mention it, so a setting the user chose stays.
"""

from __future__ import annotations

from typing import Any

NEUTRAL_VIEWS = ("Standard", "Raw")
UNDO_HINT = "Render Properties > Color Management"


def colour_changes(scene: Any) -> list[str]:
    """What in ``scene``'s colour management changes the network's colours (empty: nothing),
    each as the setting and its value, e.g. ``"View Transform AgX"``."""
    v, d = scene.view_settings, scene.display_settings
    found = []
    if v.view_transform not in NEUTRAL_VIEWS:
        found.append(f"View Transform {v.view_transform}")
    if v.look not in ("None", ""):
        found.append(f"Look {v.look}")
    if v.exposure != 0.0:
        found.append(f"Exposure {v.exposure:g}")
    if v.gamma != 1.0:
        found.append(f"Gamma {v.gamma:g}")
    if getattr(v, "use_curve_mapping", False):
        found.append("Curves on")
    if getattr(v, "use_white_balance", False):
        found.append("White Balance on")
    if d.display_device != "sRGB":
        found.append(f"Display Device {d.display_device}")
    return found


# Formats that store scene-linear values: a view transform does not apply to them.
LINEAR_FORMATS = ("OPEN_EXR", "OPEN_EXR_MULTILAYER", "HDR")


def output_colour_changes(scene: Any) -> list[str]:
    """What the render output's own colour management (Output Properties > Output > Color
    Management: Override) changes in the images Blender saves, as :func:`colour_changes`
    names it; empty when the output follows the scene or its format stores linear values."""
    image = scene.render.image_settings
    if getattr(image, "color_management", "FOLLOW_SCENE") != "OVERRIDE" or image.file_format in LINEAR_FORMATS:
        return []
    return colour_changes(image)


def colour_note(scene: Any) -> str:
    """For a render: why its image (shown, or saved) does not show the network's (the
    photos') colours, else ""."""
    notes = []
    changes = colour_changes(scene)
    if changes:
        notes.append(f"the scene's colour management ({', '.join(changes)}) changes the network's colours: images "
                     f"do not match the photos; for the photos' colours set {UNDO_HINT} to View Transform Standard, "
                     "Look None, Exposure 0, Gamma 1 (Display Device sRGB)")
    saved = output_colour_changes(scene)
    if saved:  # a saved frame (blender -b -f) follows the output's override, not the scene's view
        notes.append(f"the output's colour management override ({', '.join(saved)}) changes the network's colours "
                     "in the saved images; for the photos' colours set Output Properties > Output > Color "
                     "Management to Follow Scene, or the override to View Transform Standard, neutral")
    return "; ".join(notes)


def use_photo_colours(scene: Any) -> str:
    """Set ``scene``'s view to Standard, Look None, Exposure 0, Gamma 1, curves and white
    balance off (a Raw view transform stays: it is exact too). Returns the info line saying
    what changed and how to set it back, or "" when nothing changed. The display device is
    the user's monitor and stays (colour_note names it)."""
    v = scene.view_settings
    changed = [c for c in colour_changes(scene) if not c.startswith("Display Device")]
    if not changed:
        return ""
    if v.view_transform not in NEUTRAL_VIEWS:
        v.view_transform = "Standard"
    v.look = "None"
    v.exposure, v.gamma = 0.0, 1.0
    if getattr(v, "use_curve_mapping", False):
        v.use_curve_mapping = False
    if getattr(v, "use_white_balance", False):
        v.use_white_balance = False
    return (f"Colour management set for the photos' colours (was {', '.join(changed)}; now View Transform "
            f"{v.view_transform}, neutral): renders show the network's colours. To use another look, set it "
            f"back in {UNDO_HINT}.")
