"""Render Properties panels for the NPBG++ engine."""

from __future__ import annotations

import textwrap
from typing import Any

import bpy

SUMMARY_WIDTH = 60  # characters per label of a cancelled animation's summary: the panel cuts a longer one


class _NPBGPPPanel:
    bl_space_type = "PROPERTIES"
    bl_region_type = "WINDOW"
    bl_context = "render"
    COMPAT_ENGINES = {"NPBGPP"}

    @classmethod
    def poll(cls, context: Any) -> bool:
        return context.engine in cls.COMPAT_ENGINES


class RENDER_PT_npbgpp(_NPBGPPPanel, bpy.types.Panel):
    bl_label = "NPBG++"

    def draw(self, context: Any) -> None:
        layout = self.layout
        layout.use_property_split = True
        s = context.scene.npbgpp
        layout.prop(s, "output")
        if s.output != "NEURAL":
            layout.prop(s, "point_size")
        layout.prop(s, "point_object")
        layout.prop(s, "bundle")
        if s.output == "NEURAL" and not s.bundle:
            layout.label(text="Neural output needs a bundle (Import or Aggregate)", icon="INFO")
        from . import engine

        # no engine was left to report them (engine._render_job_cancelled); this scene's only
        summaries = engine.cancelled_job_summaries.get(context.scene.name_full)
        if summaries:
            col = layout.column(align=True)
            col.label(text="The animation was cancelled between frames:", icon="INFO")
            for level, text in summaries:
                for k, part in enumerate(textwrap.wrap(text, SUMMARY_WIDTH)):
                    col.label(text=part, icon=("ERROR" if level == "WARNING" else "INFO") if k == 0 else "BLANK1")


class RENDER_PT_npbgpp_data(_NPBGPPPanel, bpy.types.Panel):
    bl_label = "Data"
    bl_parent_id = "RENDER_PT_npbgpp"

    def draw(self, context: Any) -> None:
        layout = self.layout
        layout.use_property_split = True
        s = context.scene.npbgpp
        row = layout.row()
        row.active = not s.weights  # a weights file replaces the bundled networks
        row.prop(s, "network")
        layout.prop(s, "weights")
        layout.prop(s, "dataset_path")
        layout.prop(s, "dataset_points")
        if s.dataset_cloud:
            # read-only: it is what the dataset was imported with (the loader's cloud); a new
            # import changes it, and an edit here would leave the point object another cloud's
            row = layout.row()
            row.enabled = False
            row.prop(s, "dataset_cloud")
        if s.dataset_no_cloud and not s.dataset_points:
            layout.label(text="The dataset has no point cloud: Densify Points makes one", icon="INFO")
        from .operators import draw_photo_size

        draw_photo_size(layout, context.scene)  # Aggregate's, which its dialog shows too
        layout.prop(s, "up_axis")
        layout.prop(s, "fit_upright")
        layout.prop(s, "fit_check_view")
        row = layout.row()
        row.enabled = s.fit_check_view  # it chooses on the kept photo: nothing to choose on without the check
        row.prop(s, "fit_check_whole_views")
        row = layout.row()
        # what is kept of the two fits: nothing to keep between without both
        row.enabled = s.fit_check_view and s.fit_check_whole_views == "ON"  # Auto averages
        row.prop(s, "fit_check_combine")
        col = layout.column(align=True)
        col.operator("import_scene.npbgpp_ply", icon="IMPORT")
        col.operator("import_scene.npbgpp_bundle", icon="IMPORT")
        col.operator("import_scene.npbgpp_dataset", icon="IMPORT")
        col.operator("npbgpp.points_from_meshes", icon="OUTLINER_OB_POINTCLOUD")
        col.operator("npbgpp.densify", icon="OUTLINER_OB_POINTCLOUD")
        col.operator("npbgpp.aggregate", icon="MOD_PARTICLES")
        col.operator("npbgpp.fit", icon="SHADERFX")
        col.operator("npbgpp.export_dataset", icon="EXPORT")


class RENDER_PT_npbgpp_performance(_NPBGPPPanel, bpy.types.Panel):
    bl_label = "Performance"
    bl_parent_id = "RENDER_PT_npbgpp"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context: Any) -> None:
        layout = self.layout
        layout.use_property_split = True
        s = context.scene.npbgpp
        layout.prop(s, "device")
        layout.prop(s, "precision")
        layout.prop(s, "preview_scale")
        layout.prop(s, "viewport_roll_context")
        layout.prop(s, "refiner_impl")
        layout.prop(s, "tile_size")
        layout.prop(s, "worker_mode")
        row = layout.row()
        row.active = s.worker_mode == "PROCESS"
        row.prop(s, "worker_timeout")
        layout.operator("npbgpp.stop_worker", icon="CANCEL")


class RENDER_PT_npbgpp_format(_NPBGPPPanel, bpy.types.Panel):
    """Output Properties > Format > NPBG++: beside the Resolution that F12's framing note asks for,
    the button that sets it to the scene camera's photo (camera_bridge.USE_PHOTO_SIZE_BUTTON)."""

    bl_label = "NPBG++"
    bl_context = "output"
    bl_parent_id = "RENDER_PT_format"

    def draw(self, context: Any) -> None:
        self.layout.operator("npbgpp.use_camera_photo_size", icon="CAMERA_DATA")


class VIEWLAYER_PT_npbgpp_passes(bpy.types.Panel):
    """View Layer > Passes > Data for NPBG++ (its parent is Blender's Passes panel)."""

    bl_label = "Data"
    bl_space_type = "PROPERTIES"
    bl_region_type = "WINDOW"
    bl_context = "view_layer"
    bl_parent_id = "VIEWLAYER_PT_layer_passes"
    COMPAT_ENGINES = {"NPBGPP"}

    @classmethod
    def poll(cls, context: Any) -> bool:
        return context.engine in cls.COMPAT_ENGINES

    def draw(self, context: Any) -> None:
        layout = self.layout
        layout.use_property_split = True
        layout.use_property_decorate = False
        col = layout.column()
        col.prop(context.view_layer, "use_pass_z")
        col.label(text="The NPBG Points pass is always written", icon="INFO")


CLASSES = (RENDER_PT_npbgpp, RENDER_PT_npbgpp_data, RENDER_PT_npbgpp_performance, RENDER_PT_npbgpp_format,
           VIEWLAYER_PT_npbgpp_passes)


register, unregister = bpy.utils.register_classes_factory(CLASSES)
