"""ScoreFusion: MRI super-resolution and contrast synthesis with Score-Fusion, inside 3D Slicer.

The module is a thin shell: all state changes of the GUI come from ``ScoreFusionLib.presenter``,
all scene work from ``ScoreFusionSlicerLib`` (tested outside Slicer against slicer-core's MRML
scene), and all computation happens in a worker subprocess (``ScoreFusionLib/worker.py``), so a
run never freezes Slicer and can always be cancelled.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

CACHE_DIR_SETTING = "ScoreFusion/CacheDir"
PROBE_TIMEOUT_MS = 120000


def _moduleDir():
    return os.path.dirname(os.path.abspath(__file__))


def libRoot():
    """The folder holding ``ScoreFusionLib``: beside this file when installed, one level up in a source tree."""
    for candidate in (_moduleDir(), os.path.dirname(_moduleDir())):
        if os.path.isfile(os.path.join(candidate, "ScoreFusionLib", "__init__.py")):
            return candidate
    raise RuntimeError(f"ScoreFusionLib was not found next to {_moduleDir()}; the extension is incomplete")


def ensureLibImportable():
    """Put ScoreFusionLib on sys.path (called from setup and the logic, never at import time)."""
    root = libRoot()
    if root not in sys.path:
        sys.path.insert(0, root)


def resourceFile(relative):
    """A file of the extension's Resources folder (installed: beside the module; source tree: one level up)."""
    for base in (_moduleDir(), os.path.dirname(_moduleDir())):
        path = os.path.join(base, "Resources", relative)
        if os.path.exists(path):
            return path
    raise RuntimeError(f"the resource {relative} is missing from the ScoreFusion extension")


def applyCacheDirSetting():
    """``SCOREFUSION_HOME`` from the Advanced section's cache folder (kept in the application settings)."""
    folder = qt.QSettings().value(CACHE_DIR_SETTING, "")
    if folder:
        os.environ["SCOREFUSION_HOME"] = folder


def pythonSlicer():
    executable = shutil.which("PythonSlicer")
    if not executable:
        raise RuntimeError("PythonSlicer was not found on the PATH; the worker cannot be started")
    return executable


#
# ScoreFusion
#


class ScoreFusion(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("ScoreFusion")
        self.parent.categories = [_("Image Synthesis")]
        self.parent.dependencies = []
        # from a source tree Slicer looks for the icon beside this file, not in the top-level Resources/
        self.parent.icon = qt.QIcon(resourceFile("Icons/ScoreFusion.png"))
        self.parent.contributors = ["ScoreFusion developers"]
        self.parent.helpText = _(
            "Super-resolve an MRI volume or synthesize a missing contrast with Score-Fusion: 2D diffusion "
            "models along the axial, coronal and sagittal planes, fused into one 3D model. Outputs are "
            "AI-generated images for research, not for diagnosis. Requires Slicer 5.10 or later. See the "
            '<a href="https://github.com/scorefusion/SlicerScoreFusion#readme">documentation</a>.'
        )
        self.parent.acknowledgementText = _(
            "Score-Fusion: Sun et al., ICML 2025 (arXiv 2501.07430). The default models are small demonstration "
            "models trained on data derived from the ICBM152 2009a template."
        )


#
# Parameter node
#


@parameterNodeWrapper
class ScoreFusionParameterNode:
    """The module's settings, saved with the scene; the .ui's SlicerParameterName values name these fields."""

    task: str = "super_resolve"
    targetContrast: str = ""
    modelId: str = ""
    preset: str = "default"
    device: str = "auto"
    inputVolume1: vtkMRMLScalarVolumeNode
    inputVolume2: vtkMRMLScalarVolumeNode
    inputVolume3: vtkMRMLScalarVolumeNode
    outputVolume: vtkMRMLScalarVolumeNode
    method: str = "auto"
    seed: Annotated[int, WithinRange(0, 2147483647)] = 0
    samples: Annotated[int, WithinRange(1, 16)] = 1
    showUncertainty: bool = True
    sideBySide: bool = True
    tileSize: Annotated[int, WithinRange(0, 512)] = 0
    memoryLimitGB: Annotated[float, WithinRange(0.0, 1024.0)] = 0.0
    sliceBatch: Annotated[int, WithinRange(1, 256)] = 8
    keepJobFiles: bool = False


#
# ScoreFusionWidget
#


class ScoreFusionWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    INPUT_SLOTS = 3

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.presenter = None
        self.models = []
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updatingCombos = False
        self._probe = None
        self._modelJob = None
        self._segmentation = None

    # -- set-up ----------------------------------------------------------------------------
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        ensureLibImportable()
        applyCacheDirSetting()
        from ScoreFusionLib.module_choices import TASK_TITLES
        from ScoreFusionLib.presenter import Presenter

        uiWidget = slicer.util.loadUI(resourceFile("UI/ScoreFusion.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.presenter = Presenter()
        self.logic = ScoreFusionLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.taskComboBox.clear()
        for key, title in TASK_TITLES.items():
            self.ui.taskComboBox.addItem(_(title), key)
        self.ui.deviceComboBox.clear()
        self.ui.deviceComboBox.addItem(_("Auto"), "auto")
        self.ui.deviceComboBox.addItem(_("CPU"), "cpu")
        self.ui.cacheDirLineEdit.currentPath = qt.QSettings().value(CACHE_DIR_SETTING, "")
        self.ui.modelsTableWidget.horizontalHeader().setSectionResizeMode(0, qt.QHeaderView.Stretch)

        self.ui.taskComboBox.connect("currentIndexChanged(int)", self.onTaskChanged)
        self.ui.targetContrastComboBox.connect("currentIndexChanged(int)", self.onTargetChanged)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.presetComboBox.connect("currentIndexChanged(int)", self.onPresetChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.downloadModelButton.connect("clicked(bool)", self.onDownloadModel)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.openCacheFolderButton.connect("clicked(bool)", self.onOpenCacheFolder)
        self.ui.deleteModelButton.connect("clicked(bool)", self.onDeleteModel)
        self.ui.cacheDirLineEdit.connect("currentPathChanged(QString)", self.onCacheDirChanged)
        for slot in range(1, self.INPUT_SLOTS + 1):
            self._inputSelector(slot).connect("currentNodeChanged(vtkMRMLNode*)", self.updateApplyState)

        self.refreshModels()
        self.initializeParameterNode()
        self.render()

    def cleanup(self):
        self.logic.cancel()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()
        if self._probe is None:
            qt.QTimer.singleShot(0, self.startDeviceProbe)

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event):
        self.logic.cancel()  # a closing scene takes the inputs away: stop the run, import nothing
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume1:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume1 = first

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self._selectByData(self.ui.taskComboBox, self._parameterNode.task)
            self.onTaskChanged()

    # -- models, task and inputs -------------------------------------------------------------
    def _inputSelector(self, slot):
        return getattr(self.ui, f"inputVolume{slot}Selector")

    def _inputLabel(self, slot):
        return getattr(self.ui, f"inputVolume{slot}Label")

    @staticmethod
    def _selectByData(combo, data):
        index = combo.findData(data)
        if index >= 0:
            combo.setCurrentIndex(index)

    @staticmethod
    def _currentData(combo):
        return combo.itemData(combo.currentIndex) if combo.currentIndex >= 0 else None

    def currentModel(self):
        model_id = self._currentData(self.ui.modelComboBox)
        return next((m for m in self.models if m["id"] == model_id), None)

    def refreshModels(self):
        """Re-read the registry and the cache; fill the Models table and the task's model list."""
        from ScoreFusionLib.registry.listing import list_models

        try:
            self.models = list_models()
        except Exception as exc:  # a broken registry file must not break the module
            logging.error(f"ScoreFusion: cannot list models: {exc}")
            self.models = []
            self.ui.statusLabel.text = _("Cannot list models: {error}").format(error=exc)
        table = self.ui.modelsTableWidget
        table.setRowCount(len(self.models))
        for row, model in enumerate(self.models):
            status = _("installed") if model.get("installed") else (
                _("download needed") if model.get("remote") else _("embedded"))
            if model.get("source") == "imported":
                status += _(" (imported)")
            cells = (model.get("title") or model["id"], model["version"], status,
                     f"{model.get('size', 0) / 1e6:.1f} MB" if model.get("size") else "")
            for column, text in enumerate(cells):
                item = qt.QTableWidgetItem(text)
                item.setData(qt.Qt.UserRole, model["id"])
                table.setItem(row, column, item)
        self.onTaskChanged()

    def onTaskChanged(self, _index=None):
        from ScoreFusionLib.module_choices import contrast_title, targets_for_task

        task = self._currentData(self.ui.taskComboBox) or "super_resolve"
        if self._parameterNode:
            self._parameterNode.task = task
        self._updatingCombos = True
        self.ui.targetContrastComboBox.clear()
        for target in targets_for_task(self.models, task):
            self.ui.targetContrastComboBox.addItem(contrast_title(target), target)
        self._updatingCombos = False
        if self._parameterNode:
            self._selectByData(self.ui.targetContrastComboBox, self._parameterNode.targetContrast)
        self.onTargetChanged()

    def onTargetChanged(self, _index=None):
        from ScoreFusionLib.module_choices import model_label, models_for_task

        if self._updatingCombos:
            return
        task = self._currentData(self.ui.taskComboBox) or "super_resolve"
        target = self._currentData(self.ui.targetContrastComboBox)
        if self._parameterNode and target:
            self._parameterNode.targetContrast = target
        self._updatingCombos = True
        self.ui.modelComboBox.clear()
        for model in models_for_task(self.models, task, target):
            self.ui.modelComboBox.addItem(model_label(model), model["id"])
        self._updatingCombos = False
        if self._parameterNode:
            self._selectByData(self.ui.modelComboBox, self._parameterNode.modelId)
        self.onModelChanged()

    def onModelChanged(self, _index=None):
        from ScoreFusionLib.module_choices import (
            QUALITY_PRESETS,
            contrast_title,
            model_card_html,
            preset_label,
            required_inputs,
        )

        if self._updatingCombos:
            return
        model = self.currentModel()
        if self._parameterNode and model:
            self._parameterNode.modelId = model["id"]
        self.ui.modelCardBrowser.setHtml(model_card_html(model) if model else _(
            "<p>No model for this task. Import one in the Models section.</p>"))
        needed = required_inputs(model) if model else []
        for slot in range(1, self.INPUT_SLOTS + 1):
            visible = slot <= len(needed)
            self._inputLabel(slot).visible = visible
            self._inputSelector(slot).visible = visible
            if visible:
                self._inputLabel(slot).text = _("Input {contrast}:").format(contrast=contrast_title(needed[slot - 1]))
        self._updatingCombos = True
        self.ui.presetComboBox.clear()
        for p in QUALITY_PRESETS:
            self.ui.presetComboBox.addItem(preset_label(p.key, model.get("sampling") if model else None), p.key)
        self._updatingCombos = False
        self._selectByData(self.ui.presetComboBox, self._parameterNode.preset if self._parameterNode else "default")
        self.updateApplyState()

    def onPresetChanged(self, _index=None):
        if not self._updatingCombos and self._parameterNode:
            self._parameterNode.preset = self._currentData(self.ui.presetComboBox) or "default"

    def onDeviceChanged(self, _index=None):
        if self._parameterNode:
            self._parameterNode.device = self._currentData(self.ui.deviceComboBox) or "auto"

    def updateApplyState(self, _node=None):
        self.render()

    # -- devices (filled lazily from the worker's probe) -------------------------------------
    def startDeviceProbe(self):
        from ScoreFusionSlicerLib.deps import torch_satisfied

        if not torch_satisfied():
            self.ui.deviceComboBox.setItemText(0, _("Auto (PyTorch is installed on first Apply)"))
            return
        worker = os.path.join(libRoot(), "ScoreFusionLib", "worker.py")
        self._probe = subprocess.Popen([pythonSlicer(), worker, "probe"], stdout=subprocess.PIPE,
                                       stderr=subprocess.DEVNULL, text=True)
        self._probeWaitedMs = 0
        qt.QTimer.singleShot(200, self._pollDeviceProbe)

    def _pollDeviceProbe(self):
        if self._probe.poll() is None:
            self._probeWaitedMs += 200
            if self._probeWaitedMs < PROBE_TIMEOUT_MS:
                qt.QTimer.singleShot(200, self._pollDeviceProbe)
            else:
                self._probe.kill()
            return
        try:
            info = json.loads(self._probe.stdout.read().strip().splitlines()[-1])
        except (ValueError, IndexError):
            return
        for device in info.get("devices", []):
            total = (device.get("total_bytes") or 0) / 2**30
            label = f"GPU {device['index']} – {device.get('name', '?')} ({total:.0f} GB)"
            if self.ui.deviceComboBox.findData(device["id"]) < 0:
                self.ui.deviceComboBox.addItem(label, device["id"])
        if self._parameterNode:
            self._selectByData(self.ui.deviceComboBox, self._parameterNode.device)

    # -- Apply / Cancel --------------------------------------------------------------------------
    def render(self):
        """Copy the presenter's view state onto the widgets; the only place the run area changes."""
        if self.presenter is None:
            return
        from ScoreFusionLib.module_choices import required_inputs

        view = self.presenter.view_state()
        model = self.currentModel()
        ready = model is not None and all(self._inputSelector(slot).currentNode() is not None
                                          for slot in range(1, len(required_inputs(model)) + 1))
        self.ui.applyButton.text = _(view["apply_text"])
        self.ui.applyButton.enabled = view["apply_enabled"] and (ready or view["apply_text"] == "Cancel")
        for name in ("inputsCollapsibleButton", "methodCollapsibleButton", "outputsCollapsibleButton",
                     "advancedCollapsibleButton", "modelsCollapsibleButton"):
            getattr(self.ui, name).enabled = not view["inputs_locked"]
        self.ui.progressBar.visible = view["progress_visible"]
        self.ui.progressBar.value = view["progress_value"]
        self.ui.progressBar.format = view["progress_text"]
        status = view["status"]
        if view["hint"]:
            status += "\n" + view["hint"].splitlines()[-1]
        self.ui.statusLabel.text = status
        if self.ui.statusLog.toPlainText() != view["log"]:
            self.ui.statusLog.setPlainText(view["log"])
            self.ui.statusLog.moveCursor(qt.QTextCursor.End)

    def onApplyButton(self):
        if self.presenter.view_state()["apply_text"] == "Cancel":
            self.presenter.cancel()
            self.logic.cancel()
            self.render()
            return
        self.presenter.apply()
        self.render()
        try:
            with slicer.util.tryWithErrorDisplay(_("ScoreFusion could not start."), waitCursor=True):
                try:
                    self.logic.ensureDependencies()
                    request = self.buildRequest()
                except Exception as exc:
                    self.presenter.prepare_failed(str(exc))
                    raise
                self.presenter.prepared()
                self.render()
                try:
                    self.logic.processRequest(request, waitForCompletion=False, eventCallback=self.onWorkerEvent,
                                              finishedCallback=self.onRunFinished)
                except Exception as exc:
                    self.presenter.on_event({"event": "error", "kind": "input", "msg": str(exc), "hint": ""})
                    raise
        finally:
            self.render()

    def buildRequest(self):
        from ScoreFusionLib.module_choices import job_task, output_name, preset_sampling, required_inputs
        from ScoreFusionSlicerLib.logic import RunRequest

        model = self.currentModel()
        if model is None:
            raise ValueError(_("Choose a model first."))
        if model.get("remote") and not model.get("installed"):
            raise ValueError(_("Download the model first (Models section)."))
        p = self._parameterNode
        inputs = {contrast: self._inputSelector(slot).currentNode()
                  for slot, contrast in enumerate(required_inputs(model), start=1)}
        settings = {
            "task": job_task(model), "bundle": f"{model['id']}@{model['version']}", "method": p.method,
            **preset_sampling(p.preset, model.get("sampling")), "seed": p.seed, "samples": p.samples,
            "device": p.device, "slice_batch": p.sliceBatch, "tile_size": p.tileSize or None,
            "max_memory_gb": p.memoryLimitGB or None,
        }
        first = next(iter(inputs.values()))
        return RunRequest(
            inputs=inputs, settings=settings, output_node=p.outputVolume,
            output_name=output_name(first.GetName() if first else "", model), keep_job_files=p.keepJobFiles,
            show_uncertainty=p.showUncertainty, show_side_by_side=p.sideBySide,
        )

    def onWorkerEvent(self, event):
        self.presenter.on_event(event)
        self.render()

    def onRunFinished(self, handle):
        from ScoreFusionLib.presenter import IMPORTING

        self.presenter.on_exit(handle.exit_code)
        if self.presenter.state == IMPORTING:
            if handle.state == "done":
                self.presenter.import_done()
                self._prefillSegmentationInputs(handle)
            else:
                self.presenter.import_failed(handle.error, handle.hint)
        self.render()

    # -- segmentation --------------------------------------------------------------------------
    def _prefillSegmentationInputs(self, handle):
        selectors = {"t1n": self.ui.segmentationT1Selector, "t1c": self.ui.segmentationT1ceSelector,
                     "t2w": self.ui.segmentationT2Selector, "t2f": self.ui.segmentationFlairSelector}
        for contrast, node in handle.request.inputs.items():
            if contrast in selectors:
                selectors[contrast].setCurrentNode(node)
        model = self.currentModel()
        if model and handle.request.task == "synthesize" and model["target"] in selectors:
            selectors[model["target"]].setCurrentNode(handle.output_node)

    def onSegmentButton(self):
        from ScoreFusionSlicerLib.segmentation import monai_auto3dseg_available

        if self._segmentation is not None and self._segmentation.state == "running":
            self._segmentation.cancel()
            self.ui.segmentationBackendLabel.text = _("Cancelling the segmentation…")
            return
        with slicer.util.tryWithErrorDisplay(_("Segmentation failed."), waitCursor=True):
            inputs = {"t1n": self.ui.segmentationT1Selector.currentNode(),
                      "t1c": self.ui.segmentationT1ceSelector.currentNode(),
                      "t2w": self.ui.segmentationT2Selector.currentNode(),
                      "t2f": self.ui.segmentationFlairSelector.currentNode()}
            if not monai_auto3dseg_available():
                self.logic.ensureDependencies()  # ScoreFusion's segmenter runs in the worker: torch and monai
            device = self._parameterNode.device if self._parameterNode else "auto"
            self._segmentation = self.logic.segmentTumour(inputs, device=device, waitForCompletion=False,
                                                          eventCallback=self.onSegmentationEvent,
                                                          finishedCallback=self.onSegmentationFinished)
            if self._segmentation.state == "running":
                self.ui.segmentButton.text = _("Cancel segmentation")
                self.ui.segmentationBackendLabel.text = _("Running the ScoreFusion segmenter…")

    def onSegmentationEvent(self, event):
        if event.get("event") == "progress":
            self.ui.segmentationBackendLabel.text = _("ScoreFusion segmenter: window {step}/{total}").format(
                step=event["step"], total=event["total"])

    def onSegmentationFinished(self, handle):
        self.ui.segmentButton.text = _("Segment tumour")
        if handle.state == "done":
            self.ui.segmentationBackendLabel.text = _("Result: {name} (back-end: {backend})").format(
                name=handle.output_node.GetName(), backend=handle.backend)
        elif handle.state == "cancelled":
            self.ui.segmentationBackendLabel.text = _("Segmentation cancelled; nothing was added.")
        else:
            self.ui.segmentationBackendLabel.text = _("Segmentation failed; nothing was added.")
            message = _("Segmentation failed: {error}").format(error=handle.error)
            if handle.hint:
                message += "\n" + handle.hint.splitlines()[-1]
            slicer.util.errorDisplay(message)

    # -- models section --------------------------------------------------------------------------
    def _selectedTableModel(self):
        row = self.ui.modelsTableWidget.currentRow()
        if row < 0:
            return self.currentModel()
        model_id = self.ui.modelsTableWidget.item(row, 0).data(qt.Qt.UserRole)
        return next((m for m in self.models if m["id"] == model_id), None)

    def _runModelJob(self, args, doneMessage):
        from ScoreFusionSlicerLib.runner import JobRunner

        if self._modelJob is not None and self._modelJob.is_running:
            raise RuntimeError(_("A model download or import is already running."))
        jobDir = slicer.util.tempDirectory("ScoreFusion-model")
        runner = JobRunner(qt.QTimer.singleShot)
        self._modelJob = runner
        self.ui.modelsProgressBar.visible = True
        self.ui.modelsProgressBar.value = 0
        state = {"error": ""}

        def onEvent(event):
            if event.get("event") == "progress" and event.get("total"):
                self.ui.modelsProgressBar.value = int(1000 * event["step"] / event["total"])
            elif event.get("event") == "error":
                state["error"] = event.get("msg", "")

        def onDone(code):
            self.ui.modelsProgressBar.visible = False
            shutil.rmtree(jobDir, ignore_errors=True)
            if code == 0:
                self.ui.statusLabel.text = doneMessage
            else:
                slicer.util.errorDisplay(state["error"] or _("The model operation failed (exit code {code}).").format(
                    code=code))
            self.refreshModels()

        command = [pythonSlicer(), os.path.join(libRoot(), "ScoreFusionLib", "worker.py"), *args, "--job", jobDir]
        runner.start(command, jobDir, onEvent, onDone)

    def onDownloadModel(self):
        model = self._selectedTableModel()
        if model is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Download failed."), waitCursor=False):
            if model.get("remote") and not slicer.util.confirmOkCancelDisplay(
                    _("Download {title} ({size:.1f} MB)? Licence: {licence}").format(
                        title=model.get("title"), size=model.get("size", 0) / 1e6, licence=model.get("license"))):
                return
            self.logic.ensureDependencies()
            self._runModelJob(["fetch", "--id", f"{model['id']}@{model['version']}"], _("Model installed."))

    def onImportModel(self):
        path = qt.QFileDialog.getOpenFileName(self.parent, _("Import a ScoreFusion model bundle"), "",
                                              _("Bundle archive (*.zip);;Bundle manifest (manifest.json)"))
        if not path:
            return
        if os.path.basename(path) == "manifest.json":
            path = os.path.dirname(path)
        with slicer.util.tryWithErrorDisplay(_("Import failed."), waitCursor=False):
            self.logic.ensureDependencies()
            self._runModelJob(["import", "--path", path], _("Model imported."))

    def onOpenCacheFolder(self):
        from ScoreFusionLib.registry import cache_root

        folder = cache_root()
        folder.mkdir(parents=True, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))

    def onDeleteModel(self):
        from ScoreFusionLib.registry import remove_model

        model = self._selectedTableModel()
        if model is None or not model.get("installed"):
            slicer.util.infoDisplay(_("Select an installed model in the table first."))
            return
        if not slicer.util.confirmOkCancelDisplay(
                _("Delete the installed copy of {title} from {folder}?").format(
                    title=model.get("title") or model["id"], folder=model.get("installed_path"))):
            return
        with slicer.util.tryWithErrorDisplay(_("Delete failed."), waitCursor=True):
            remove_model(model["id"], model["version"])
        self.refreshModels()

    def onCacheDirChanged(self, path):
        qt.QSettings().setValue(CACHE_DIR_SETTING, path)
        if path:
            os.environ["SCOREFUSION_HOME"] = path
        else:
            os.environ.pop("SCOREFUSION_HOME", None)
        self.refreshModels()


#
# ScoreFusionLogic
#


class ScoreFusionLogic(ScriptedLoadableModuleLogic):
    """Usable without the GUI: ``process()`` runs a model on scene volumes and imports the result.

    Example (Python console)::

        logic = slicer.util.getModuleLogic("ScoreFusion")
        handle = logic.process({"t1n": volumeNode}, modelId="t1-sr4-iso", steps=20)
        print(handle.state, handle.output_node.GetName())
    """

    def __init__(self, processingLogic=None):
        ScriptedLoadableModuleLogic.__init__(self)
        ensureLibImportable()
        applyCacheDirSetting()
        if processingLogic is None:
            from ScoreFusionSlicerLib.layout import show_side_by_side
            from ScoreFusionSlicerLib.logic import ProcessingLogic

            jobRoot = os.path.join(slicer.app.temporaryPath, "ScoreFusion")
            os.makedirs(jobRoot, exist_ok=True)
            processingLogic = ProcessingLogic(pythonSlicer(), libRoot(), schedule=qt.QTimer.singleShot,
                                              job_root=jobRoot, show_results=show_side_by_side)
        self.processing = processingLogic

    def getParameterNode(self):
        return ScoreFusionParameterNode(super().getParameterNode())

    def ensureDependencies(self):
        """torch through the PyTorch extension, the rest with pip after a confirmation (first Apply only)."""
        from ScoreFusionSlicerLib import deps

        deps.ensure_torch()
        if deps.ensure_requirements(resourceFile("requirements.txt"), slicer.util.confirmOkCancelDisplay):
            logging.info("ScoreFusion: Python requirements installed")

    def process(self, inputNodes, modelId, outputNode=None, device="auto", waitForCompletion=True,
                eventCallback=None, finishedCallback=None, **settings):
        """Run ``modelId`` on ``inputNodes`` (contrast -> volume node); returns the job handle.

        ``settings`` are job settings (``steps``, ``seed``, ``samples``, ``method``, ...; see
        ``ScoreFusionLib.jobio.JobSettings``); the model's registry sampling settings are the defaults.
        """
        from ScoreFusionLib.module_choices import job_task, output_name, preset_sampling
        from ScoreFusionLib.registry.listing import list_models
        from ScoreFusionSlicerLib.logic import RunRequest

        model_id = modelId.split("@", 1)[0]
        model = next((m for m in list_models() if m["id"] == model_id), None)
        if model is None:
            raise ValueError(f"unknown model {modelId!r}")
        jobSettings = {"task": job_task(model), "bundle": modelId, "device": device,
                       **preset_sampling("default", model.get("sampling")), **settings}
        first = next(iter(inputNodes.values()))
        request = RunRequest(inputs=dict(inputNodes), settings=jobSettings, output_node=outputNode,
                             output_name=output_name(first.GetName(), model))
        return self.processRequest(request, waitForCompletion, eventCallback, finishedCallback)

    def processRequest(self, request, waitForCompletion=True, eventCallback=None, finishedCallback=None):
        return self.processing.process(request, wait_for_completion=waitForCompletion,
                                       event_callback=eventCallback, finished_callback=finishedCallback)

    def cancel(self):
        return self.processing.cancel()

    def segmentTumour(self, inputNodes, segmenter="default", device="auto", labelConvention=None,
                      waitForCompletion=True, eventCallback=None, finishedCallback=None):
        """Segment a brain tumour from T1, T1ce, T2 and FLAIR volumes (one may be synthesized).

        Uses MONAIAuto3DSeg's BraTS model when that extension is installed, otherwise ScoreFusion's own
        segmenter in the worker (``segmenter``: ``default``, a segmenter bundle folder or .zip; ``labelConvention``
        None keeps the segmenter's own). Returns the run's handle: ``handle.backend`` names what ran,
        ``handle.output_node`` is the segmentation once ``handle.state`` is ``done``.
        """
        missing = [name for name, node in inputNodes.items() if node is None]
        if missing:
            raise ValueError(_("Choose all four contrasts (missing: {names}).").format(names=", ".join(missing)))
        return self.processing.segment_tumour(inputNodes, segmenter=segmenter, device=device,
                                              label_convention=labelConvention,
                                              wait_for_completion=waitForCompletion, event_callback=eventCallback,
                                              finished_callback=finishedCallback)


#
# ScoreFusionTest
#


class ScoreFusionTest(ScriptedLoadableModuleTest):
    """The whole pipeline inside Slicer on the embedded demonstration models (CPU, a few steps)."""

    def setUp(self):
        import tempfile

        slicer.mrmlScene.Clear()
        if not hasattr(self, "_cacheDir"):  # a private model cache: the self-test never touches the user's
            self._cacheDir = tempfile.TemporaryDirectory(prefix="ScoreFusionTest-")
            self._previousHome = os.environ.get("SCOREFUSION_HOME")
            os.environ["SCOREFUSION_HOME"] = self._cacheDir.name

    def tearDown(self):
        if hasattr(self, "_cacheDir"):
            if self._previousHome is None:
                os.environ.pop("SCOREFUSION_HOME", None)
            else:
                os.environ["SCOREFUSION_HOME"] = self._previousHome
            self._cacheDir.cleanup()
            del self._cacheDir

    def runTest(self):
        self.setUp()
        ensureLibImportable()
        from ScoreFusionSlicerLib.deps import torch_satisfied

        if not torch_satisfied():
            self.delayDisplay("SKIPPED: PyTorch is not installed (install it with the PyTorch extension).")
            return
        self.test_SuperResolution()
        self.setUp()
        self.test_Synthesis()
        self.setUp()
        self.test_Cancel()
        self.tearDown()

    def _volume(self, shape_kji, spacing, name):
        import numpy as np

        rng = np.random.default_rng(0)
        array = rng.random(shape_kji).astype("float32")
        matrix = np.diag([-spacing, -spacing, spacing, 1.0])
        matrix[:3, 3] = [40.0, 30.0, -20.0]
        node = slicer.util.addVolumeFromArray(array, ijkToRAS=matrix, name=name)
        return node, array.copy(), matrix

    def test_SuperResolution(self):
        import numpy as np

        self.delayDisplay("Super-resolution x4 on a small volume")
        node, before, matrix = self._volume((18, 22, 18), 8.0, "lowres")
        logic = ScoreFusionLogic()
        handle = logic.process({"t1n": node}, modelId="t1-sr4-iso", steps=2, device="cpu")
        self.assertEqual(handle.state, "done", handle.error)
        out = handle.output_node
        self.assertEqual(out.GetImageData().GetDimensions(), (72, 88, 72))
        m = vtk.vtkMatrix4x4()
        out.GetIJKToRASMatrix(m)
        outMatrix = slicer.util.arrayFromVTKMatrix(m)
        np.testing.assert_allclose(np.abs(np.diag(outMatrix)[:3]), [2.0, 2.0, 2.0])
        # the outer box of the voxel grid is preserved: corner (-0.5, -0.5, -0.5) maps to the same point
        corner_in = matrix @ np.array([-0.5, -0.5, -0.5, 1.0])
        corner_out = outMatrix @ np.array([-0.5, -0.5, -0.5, 1.0])
        np.testing.assert_allclose(corner_in, corner_out, atol=1e-6)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), before)  # the input is untouched
        self.assertEqual(out.GetAttribute("ScoreFusion.modelId"), "t1-sr4-iso")
        lm = slicer.app.layoutManager()
        red = lm.sliceWidget("Red").sliceLogic().GetSliceCompositeNode().GetBackgroundVolumeID()
        yellow = lm.sliceWidget("Yellow").sliceLogic().GetSliceCompositeNode().GetBackgroundVolumeID()
        self.assertEqual((red, yellow), (node.GetID(), out.GetID()))
        self.delayDisplay("Super-resolution passed")

    def test_Synthesis(self):
        import numpy as np

        self.delayDisplay("T1 -> FLAIR synthesis with two samples (uncertainty)")
        node, before, matrix = self._volume((72, 88, 72), 2.0, "t1")
        logic = ScoreFusionLogic()
        handle = logic.process({"t1n": node}, modelId="t1-to-flair", steps=2, samples=2, device="cpu")
        self.assertEqual(handle.state, "done", handle.error)
        self.assertEqual(handle.output_node.GetImageData().GetDimensions(), (72, 88, 72))
        self.assertIsNotNone(handle.uncertainty_node)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), before)
        self.delayDisplay("Synthesis passed")

    def test_Cancel(self):
        self.delayDisplay("A cancelled run adds nothing to the scene")
        node = self._volume((72, 88, 72), 2.0, "t1")[0]
        logic = ScoreFusionLogic()
        volumesBefore = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
        events = []

        def onEvent(event):
            events.append(event)
            if event.get("event") == "progress":
                logic.cancel()

        handle = logic.process({"t1n": node}, modelId="t1-to-flair", steps=50, device="cpu",
                               waitForCompletion=False, eventCallback=onEvent)
        while handle.state == "running":
            slicer.app.processEvents()
        self.assertEqual(handle.state, "cancelled")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"), volumesBefore)
        self.assertFalse(os.path.exists(handle.job_dir))
        self.delayDisplay("Cancel passed")
