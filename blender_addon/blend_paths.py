"""The scene's file and folder settings (``scene.npbgpp``: Bundle, Weights, Dataset,
Dataset Points) follow Blender's rules for paths in a .blend: set by an operator in a
saved file, they are stored relative (``//...``) when the user's File Paths > Default to
Relative Paths is on, as the file browser stores an image's; and saving to another folder
rebases the relative ones, as Save's Remap Relative does for Blender's own paths (it does
not see add-on properties). So a project folder moved or copied as a whole keeps its
bundle and dataset."""

from __future__ import annotations

import os

import bpy

from .app_handlers import add_handlers, remove_handlers

PATH_SETTINGS = ("bundle", "weights", "dataset_path", "dataset_points", "dataset_cloud", "densify_output")
_before_copy: list[tuple[str, str, str]] = []  # (scene, setting, value) before a save rebased it


def owner_library(owner: bpy.types.ID | bpy.types.bpy_struct) -> bpy.types.Library | None:
    """The library file whose folder ``owner``'s ``//`` paths are relative to: a linked
    id's library, else None (the open file). ``owner``: an id, or a property group on one
    (``scene.npbgpp``). Scenes cannot be library overrides (Blender 5.0's
    ``override_create`` refuses them), so a scene's settings are the open file's or a
    linked library's."""
    owner_id = getattr(owner, "id_data", None) or owner
    return owner_id.library


def resolved(owner: bpy.types.ID | bpy.types.bpy_struct, value: str) -> str:
    """The absolute path of the path setting ``value`` read from ``owner`` (a scene or its
    ``npbgpp`` settings): a ``//`` path is relative to the .blend that holds it, which for
    a scene linked from another file (or overriding one) is that library, not the open
    file. "" stays "". Paths an operator's file browser returns are the open file's: those
    take plain ``bpy.path.abspath``."""
    if not value:
        return ""
    return bpy.path.abspath(value, library=owner_library(owner))


def stored(owner: bpy.types.ID | bpy.types.bpy_struct, path: str) -> str:
    """``path`` (absolute) as an operator stores it in a path setting of ``owner`` (a scene
    or its ``npbgpp`` settings): relative to the saved .blend when the preferences ask for
    relative paths, else as given. A linked scene's settings take it as given: :func:`resolved`
    reads their ``//`` against the library's folder, not the open file's (and Blender does
    not save what changes in a linked scene)."""
    if not path or not bpy.data.filepath or not bpy.context.preferences.filepaths.use_relative_paths:
        return path
    if owner_library(owner) is not None:
        return path
    return _rebased(path, os.path.dirname(bpy.path.abspath(bpy.data.filepath)))


def _rebased(value: str, folder: str) -> str:
    """``value`` (absolute, or ``//`` relative to the open file) as ``//...`` relative to
    ``folder`` with forward slashes, so a .blend saved on Windows opens elsewhere; absolute
    where no relative form exists (another drive on Windows)."""
    absolute = os.path.normpath(bpy.path.abspath(value))
    try:
        rel = os.path.relpath(absolute, folder)
    except ValueError:
        return absolute
    return "//" + rel.replace(os.sep, "/")


def linked_library(scene: bpy.types.Scene) -> str:
    """The .blend a linked scene comes from (absolute), "" for the open file's own scene.
    Blender saves a linked scene in that file only: settings an operator writes to it here
    last until this file is reloaded, and no object can be linked into its collections."""
    return bpy.path.abspath(scene.library.filepath) if scene.library is not None else ""


@bpy.app.handlers.persistent
def rebase_on_save(filepath: str, *_args) -> None:
    """save_pre: relative settings resolved against the file's current folder, written
    relative to the folder it is saved into."""
    _before_copy.clear()
    if not filepath:
        return
    new = os.path.dirname(os.path.abspath(filepath))
    if bpy.data.filepath:
        if os.path.normcase(os.path.dirname(bpy.path.abspath(bpy.data.filepath))) == os.path.normcase(new):
            return
        moves = "relative"  # the relative settings follow the file to its new folder
    elif bpy.context.preferences.filepaths.use_relative_paths:
        moves = "absolute"  # a first save: what operators set in the unsaved file becomes relative
    else:
        return
    for scene in bpy.data.scenes:
        if scene.library is not None or scene.override_library is not None:
            continue
        s = scene.npbgpp
        for name in PATH_SETTINGS:
            value = getattr(s, name)
            if value and value.startswith("//") == (moves == "relative"):
                _before_copy.append((scene.name, name, value))
                setattr(s, name, _rebased(value, new))


def _restore() -> None:
    for scene_name, name, value in _before_copy:
        scene = bpy.data.scenes.get(scene_name)
        if scene is not None:
            setattr(scene.npbgpp, name, value)
    _before_copy.clear()


@bpy.app.handlers.persistent
def restore_after_copy(filepath: str, *_args) -> None:
    """save_post: after Save Copy the session stays in the old file: its settings go back."""
    if os.path.normcase(os.path.abspath(filepath)) != os.path.normcase(bpy.path.abspath(bpy.data.filepath)):
        _restore()
    _before_copy.clear()


@bpy.app.handlers.persistent
def restore_after_failure(_filepath: str, *_args) -> None:
    """save_post_fail: nothing was written and the session stays in the old file."""
    _restore()


HANDLERS = (("save_pre", rebase_on_save), ("save_post", restore_after_copy), ("save_post_fail", restore_after_failure))


def register() -> None:
    add_handlers(HANDLERS)  # save_post_fail: Blender 4.3 on (skipped before)


def unregister() -> None:
    remove_handlers(HANDLERS)
