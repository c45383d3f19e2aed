"""The scene's colour management against the network's colours (no bpy import: attribute access only).

The engine writes the network's display-sRGB output as scene-linear values (frames.py), which
Blender shows and saves unchanged only when its view transform is Standard (or Raw) with no
look, exposure 0, gamma 1, no curves or white balance (the display device then maps them
to the monitor, so a Display P3 screen shows the right colours; only 8-bit files saved under
a display device other than sRGB hold other values than the network's). Blender 5's
default, AgX, tone-maps them (up to 125/255 apart in 8 bits, BLENDER-NOTES.md): the photos'
colours come out desaturated. Imports that set a scene up for neural rendering therefore
switch to Standard (saying so); renders only mention it, so a setting the user chose stays.
"""

from __future__ import annotations

from typing import Any

NEUTRAL_VIEWS = ("Standard", "Raw")
UNDO_HINT = "Render Properties > Color Management"


def colour_changes(scene: Any) -> list[str]:
    """What in ``scene``'s view settings changes the network's colours (empty: nothing),
    each as the setting and its value, e.g. ``"View Transform AgX"``. Not the display
    device: on screen it is the monitor's, and Blender maps the scene-linear values to it
    correctly (see :func:`saved_display_change` for files)."""
    v = scene.view_settings
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
    return found


def saved_display_change(settings: Any) -> str:
    """``"Display Device <name>"`` when ``settings``' (a scene's, or an output override's)
    display device is not sRGB, else "". An 8-bit file saved under it is encoded for that
    display (Display P3: linear 0.8, 0.1, 0.05 saves as 214, 98, 73, not sRGB's 231, 89, 63;
    measured with Image.save_render in bpy 5.0.1) and PNG/JPEG readers take it as sRGB, so its
    values are not the network's; the screen, by contrast, shows the right colours."""
    device = settings.display_settings.display_device
    return "" if device == "sRGB" else f"Display Device {device}"


# Formats that store scene-linear values: a view transform does not apply to them.
LINEAR_FORMATS = ("OPEN_EXR", "OPEN_EXR_MULTILAYER", "HDR")


def output_colour_changes(scene: Any) -> list[str]:
    """What the render output's own colour management (Output Properties > Output > Color
    Management: Override) changes in the images Blender saves, as :func:`colour_changes`
    names it; empty when the output follows the scene or its format stores linear values."""
    image = scene.render.image_settings
    if getattr(image, "color_management", "FOLLOW_SCENE") != "OVERRIDE" or image.file_format in LINEAR_FORMATS:
        return []
    display = saved_display_change(image)
    return colour_changes(image) + ([display] if display else [])


def colour_note(scene: Any) -> str:
    """For a render: why its image (shown, or saved) does not show the network's (the
    photos') colours, else ""."""
    notes = []
    changes = colour_changes(scene)
    if changes:
        notes.append(f"the scene's colour management ({', '.join(changes)}) changes the network's colours: images "
                     f"do not match the photos; for the photos' colours set {UNDO_HINT} to View Transform Standard, "
                     "Look None, Exposure 0, Gamma 1")
    image = scene.render.image_settings
    follows = getattr(image, "color_management", "FOLLOW_SCENE") != "OVERRIDE"
    display = saved_display_change(scene) if follows and image.file_format not in LINEAR_FORMATS else ""
    if display:  # the screen is right; only saved 8-bit files are encoded for that display
        notes.append(f"the scene's {display} encodes saved 8-bit images for that display: their values differ "
                     "from the network's (the screen shows its colours); for the photos' values in files set "
                     "Display Device sRGB, or save EXR")
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
    the user's monitor and stays (colour_note names it for saved files)."""
    v = scene.view_settings
    changed = colour_changes(scene)
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
