"""The module's Qt Designer file, loaded offscreen with PySide6.

Slicer cannot run here, so the .ui is checked three ways: as XML (names, custom classes, the
``mrmlSceneChanged`` wiring), as widgets built by QUiLoader with stand-ins named like Slicer's classes
(``ui_stubs``: properties, ranges and flags are applied, so a typo or a wrong value shows up), and
against ``ScoreFusionSlicer/ScoreFusion.py`` (every ``self.ui.<name>`` exists, every
``SlicerParameterName`` is a parameter-node field). A screenshot of the filled panel is written to
``build/test-artifacts/ScoreFusion-ui.png`` for review, and to ``Screenshots/01.png`` (the Extensions
Index screenshot) only with ``SCOREFUSION_UPDATE_SCREENSHOT=1``.

PySide6 comes with the ``ui`` extra: off CI a missing copy skips this module, under CI=true it fails.
"""

from __future__ import annotations

import ast
import os
import re
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

try:
    from PySide6.QtCore import SIGNAL, QFile, QIODevice, QObject, Qt, QtMsgType, qInstallMessageHandler
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import (
        QAbstractItemView,
        QApplication,
        QCheckBox,
        QComboBox,
        QDoubleSpinBox,
        QFormLayout,
        QLabel,
        QPlainTextEdit,
        QProgressBar,
        QPushButton,
        QSpinBox,
        QTableWidget,
        QTableWidgetItem,
    )

    from ui_stubs import (
        SLICER_STUBS,
        ctkCollapsibleButton,
        ctkFittedTextBrowser,
        ctkPathLineEdit,
        qMRMLNodeComboBox,
        qMRMLWidget,
    )
except ImportError as exc:
    if os.environ.get("CI") == "true":
        raise
    pytest.skip(f"PySide6 is not usable ({exc}): pip install -e '.[ui]'", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]
UI_FILE = REPO / "Resources" / "UI" / "ScoreFusion.ui"
MODULE_FILE = REPO / "ScoreFusionSlicer" / "ScoreFusion.py"
ARTIFACT = REPO / "build" / "test-artifacts" / "ScoreFusion-ui.png"
CATALOG_SCREENSHOT = REPO / "Screenshots" / "01.png"
SCREENSHOT_WIDTH = 480

SCENE_SIGNAL = "mrmlSceneChanged(vtkMRMLScene*)"
SCENE_SLOT = "setMRMLScene(vtkMRMLScene*)"

#: Section -> {object name: class}: the names ScoreFusion.py relies on, and where they sit.
SECTIONS = {
    "inputsCollapsibleButton": {
        "taskComboBox": QComboBox,
        "targetContrastComboBox": QComboBox,
        "modelComboBox": QComboBox,
        "modelCardBrowser": ctkFittedTextBrowser,
        "inputVolume1Label": QLabel,
        "inputVolume1Selector": qMRMLNodeComboBox,
        "inputVolume2Label": QLabel,
        "inputVolume2Selector": qMRMLNodeComboBox,
        "inputVolume3Label": QLabel,
        "inputVolume3Selector": qMRMLNodeComboBox,
    },
    "methodCollapsibleButton": {
        "methodComboBox": QComboBox,
        "presetComboBox": QComboBox,
        "deviceComboBox": QComboBox,
        "seedSpinBox": QSpinBox,
        "samplesSpinBox": QSpinBox,
        "showUncertaintyCheckBox": QCheckBox,
    },
    "outputsCollapsibleButton": {
        "outputVolumeSelector": qMRMLNodeComboBox,
        "sideBySideCheckBox": QCheckBox,
    },
    "segmentationCollapsibleButton": {
        "segmentationBackendLabel": QLabel,
        "segmentationT1Selector": qMRMLNodeComboBox,
        "segmentationT1ceSelector": qMRMLNodeComboBox,
        "segmentationT2Selector": qMRMLNodeComboBox,
        "segmentationFlairSelector": qMRMLNodeComboBox,
        "segmentButton": QPushButton,
    },
    "advancedCollapsibleButton": {
        "tileSizeSpinBox": QSpinBox,
        "memoryLimitSpinBox": QDoubleSpinBox,
        "sliceBatchSpinBox": QSpinBox,
        "keepJobFilesCheckBox": QCheckBox,
        "cacheDirLabel": QLabel,
        "cacheDirLineEdit": ctkPathLineEdit,
    },
    "modelsCollapsibleButton": {
        "modelsTableWidget": QTableWidget,
        "downloadModelButton": QPushButton,
        "importModelButton": QPushButton,
        "openCacheFolderButton": QPushButton,
        "deleteModelButton": QPushButton,
        "modelsProgressBar": QProgressBar,
    },
}
#: Section -> (title, collapsed when the module opens).
SECTION_TITLES = {
    "inputsCollapsibleButton": ("Inputs", False),
    "methodCollapsibleButton": ("Method", False),
    "outputsCollapsibleButton": ("Outputs", False),
    "segmentationCollapsibleButton": ("Segmentation", True),
    "advancedCollapsibleButton": ("Advanced", True),
    "modelsCollapsibleButton": ("Models", True),
}
RUN_AREA = {"applyButton": QPushButton, "progressBar": QProgressBar, "statusLabel": QLabel, "statusLog": QPlainTextEdit}

#: Widget -> the ScoreFusionParameterNode field that connectGui binds it to.
PARAMETER_NAMES = {
    "inputVolume1Selector": "inputVolume1",
    "inputVolume2Selector": "inputVolume2",
    "inputVolume3Selector": "inputVolume3",
    "outputVolumeSelector": "outputVolume",
    "methodComboBox": "method",
    "seedSpinBox": "seed",
    "samplesSpinBox": "samples",
    "showUncertaintyCheckBox": "showUncertainty",
    "sideBySideCheckBox": "sideBySide",
    "tileSizeSpinBox": "tileSize",
    "memoryLimitSpinBox": "memoryLimitGB",
    "sliceBatchSpinBox": "sliceBatch",
    "keepJobFilesCheckBox": "keepJobFiles",
}

#: Slicer and CTK widgets a scripted module's .ui may use (they exist in every Slicer 5 build);
#: the value is the base Slicer's own .ui files declare, which QUiLoader falls back to.
KNOWN_SLICER_CLASSES = {
    "qMRMLWidget": "QWidget",
    "qMRMLNodeComboBox": "QWidget",
    "qMRMLSliderWidget": "ctkSliderWidget",
    "qMRMLSegmentSelectorWidget": "qMRMLWidget",
    "ctkCollapsibleButton": "QWidget",
    "ctkCollapsibleGroupBox": "QGroupBox",
    "ctkFittedTextBrowser": "QTextBrowser",
    "ctkPathLineEdit": "QWidget",
    "ctkSliderWidget": "QWidget",
    "ctkRangeWidget": "QWidget",
    "ctkComboBox": "QComboBox",
    "ctkMenuButton": "QPushButton",
}


# --------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def app():
    """One QApplication on the offscreen platform, so no display is needed."""
    mp = pytest.MonkeyPatch()
    mp.setenv("QT_QPA_PLATFORM", "offscreen")
    application = QApplication.instance() or QApplication([])
    yield application
    mp.undo()


def load_panel(app):
    """Build the panel with the Slicer stand-ins; returns it with the Qt warnings printed while loading."""
    loader = QUiLoader()
    for cls in SLICER_STUBS:
        loader.registerCustomWidget(cls)
    warnings = []

    def collect(mode, context, message):
        if mode != QtMsgType.QtDebugMsg:
            warnings.append(message)

    previous = qInstallMessageHandler(collect)
    ui_file = QFile(str(UI_FILE))
    try:
        assert ui_file.open(QIODevice.ReadOnly), f"cannot open {UI_FILE}"
        panel = loader.load(ui_file)
    finally:
        ui_file.close()
        qInstallMessageHandler(previous)
    assert panel is not None, loader.errorString()
    return panel, warnings


@pytest.fixture(scope="module")
def loaded(app):
    return load_panel(app)


@pytest.fixture(scope="module")
def panel(loaded):
    return loaded[0]


def child(panel, name):
    widget = panel.findChild(QObject, name)
    assert widget is not None, f"{name} is missing from {UI_FILE.name}"
    return widget


@pytest.fixture(scope="module")
def tree():
    return ET.parse(UI_FILE)


def widget_classes(tree):
    """Object name -> class of every <widget> in the file."""
    return {w.get("name"): w.get("class") for w in tree.iter("widget")}


def module_ast():
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"), filename=str(MODULE_FILE))


def is_self_ui(node):
    return (isinstance(node, ast.Attribute) and node.attr == "ui"
            and isinstance(node.value, ast.Name) and node.value.id == "self")


# --------------------------------------------------------------------------------------------
# The file itself


def test_ui_is_well_formed_xml_with_unique_object_names(tree):
    root = tree.getroot()
    assert root.tag == "ui" and root.findtext("class") == "ScoreFusion"
    top = root.find("widget")
    assert (top.get("class"), top.get("name")) == ("qMRMLWidget", "ScoreFusion")
    names = [e.get("name") for tag in ("widget", "layout", "spacer") for e in root.iter(tag)]
    duplicates = [n for n, count in Counter(names).items() if count > 1]
    assert not duplicates, f"duplicate object names: {duplicates}"


def test_custom_classes_are_known_slicer_widgets_declared_like_slicer_does(tree):
    declared = {c.findtext("class"): c for c in tree.getroot().iter("customwidget")}
    used = set(widget_classes(tree).values())
    unknown = set(declared) - set(KNOWN_SLICER_CLASSES)
    assert not unknown, f"custom classes that are not Slicer/CTK widgets: {sorted(unknown)}"
    custom_used = {c for c in used if not c.startswith("Q")}
    assert custom_used == set(declared), "every custom class used is declared, and every declared one used"
    for name, decl in declared.items():
        assert decl.findtext("extends") == KNOWN_SLICER_CLASSES[name], name
        assert decl.findtext("header") == f"{name}.h", name
    containers = {name for name, decl in declared.items() if decl.findtext("container") == "1"}
    assert containers == {"qMRMLWidget", "ctkCollapsibleButton"}


def test_every_node_selector_receives_the_scene(tree, panel):
    combos = {n for n, c in widget_classes(tree).items() if c == "qMRMLNodeComboBox"}
    assert len(combos) == 8  # three inputs, the output, four segmentation contrasts
    wired = set()
    for connection in tree.getroot().iter("connection"):
        assert connection.findtext("sender") == "ScoreFusion"
        assert connection.findtext("signal") == SCENE_SIGNAL
        assert connection.findtext("slot") == SCENE_SLOT
        wired.add(connection.findtext("receiver"))
    assert wired == combos
    # QUiLoader resolved each connection against the stubs' signal and slot signatures.
    assert panel.receivers(SIGNAL(SCENE_SIGNAL)) == len(combos)


# --------------------------------------------------------------------------------------------
# The widgets QUiLoader builds


def test_panel_loads_into_the_slicer_stand_ins_without_warnings(loaded):
    panel, warnings = loaded
    assert type(panel) is qMRMLWidget and panel.objectName() == "ScoreFusion"
    assert warnings == []


def test_every_property_in_the_file_is_declared_by_its_widget(tree, panel):
    # QUiLoader keeps a misspelt property as a silent dynamic one; only stdset="0" ones are meant so.
    for element in tree.iter("widget"):
        name = element.get("name")
        widget = panel if name == panel.objectName() else child(panel, name)
        meta = widget.metaObject()
        for prop in element.findall("property"):
            if prop.get("stdset") != "0":
                assert meta.indexOfProperty(prop.get("name")) >= 0, f"{name}.{prop.get('name')}"


def test_every_named_widget_exists_with_its_class_in_its_section(panel):
    for section_name, widgets in SECTIONS.items():
        section = child(panel, section_name)
        assert type(section) is ctkCollapsibleButton
        assert isinstance(section.layout(), QFormLayout), section_name
        for name, cls in widgets.items():
            widget = child(panel, name)
            assert type(widget) is cls, f"{name} is a {type(widget).__name__}, not a {cls.__name__}"
            assert section.isAncestorOf(widget), f"{name} is not in {section_name}"
    for name, cls in RUN_AREA.items():
        widget = child(panel, name)
        assert type(widget) is cls and widget.parent() is panel, name


def test_sections_have_slicer_titles_and_initial_collapsed_state(panel):
    for name, (title, collapsed) in SECTION_TITLES.items():
        section = child(panel, name)
        assert (section.text, section.collapsed) == (title, collapsed), name


def test_combo_boxes_hold_the_fixed_choices_and_leave_the_rest_to_the_module(panel):
    items = {name: [child(panel, name).itemText(i) for i in range(child(panel, name).count())]
             for name in ("taskComboBox", "methodComboBox", "targetContrastComboBox", "modelComboBox",
                          "presetComboBox", "deviceComboBox")}
    assert items["taskComboBox"] == ["Super-resolve", "Synthesize contrast"]
    assert items["methodComboBox"] == ["auto", "score-fusion", "average", "tpdm", "single"]
    for runtime in ("targetContrastComboBox", "modelComboBox", "presetComboBox", "deviceComboBox"):
        assert items[runtime] == [], f"{runtime} is filled at run time"


def test_model_card_is_a_read_only_browser_that_opens_links(panel):
    card = child(panel, "modelCardBrowser")
    assert card.isReadOnly() and card.openExternalLinks()


def test_node_selectors_pick_scalar_volumes_and_only_the_output_creates_nodes(panel):
    names = [n for widgets in SECTIONS.values() for n, cls in widgets.items() if cls is qMRMLNodeComboBox]
    for name in names:
        combo = child(panel, name)
        assert combo.nodeTypes == ["vtkMRMLScalarVolumeNode"] and not combo.showChildNodeTypes, name
        assert combo.noneEnabled, name
        editable = (combo.addEnabled, combo.removeEnabled, combo.renameEnabled)
        assert editable == ((True,) * 3 if name == "outputVolumeSelector" else (False,) * 3), name
    output = child(panel, "outputVolumeSelector")
    assert (output.noneDisplay, output.baseName) == ("Create new volume", "ScoreFusion output")
    assert output.itemText(0) == "Create new volume"


def test_spin_boxes_match_the_parameter_ranges_and_show_auto_at_zero(panel):
    expected = {  # name: (minimum, maximum, value, special value text, suffix)
        "seedSpinBox": (0, 2147483647, 0, "", ""),
        "samplesSpinBox": (1, 16, 1, "", ""),
        "tileSizeSpinBox": (0, 512, 0, "auto", " voxels"),
        "memoryLimitSpinBox": (0.0, 1024.0, 0.0, "auto", " GB"),
        "sliceBatchSpinBox": (1, 256, 8, "", ""),
    }
    for name, values in expected.items():
        spin = child(panel, name)
        assert (spin.minimum(), spin.maximum(), spin.value(), spin.specialValueText(), spin.suffix()) == values, name
    assert child(panel, "tileSizeSpinBox").text() == "auto"
    assert "uncertainty" in child(panel, "samplesSpinBox").toolTip()


def test_check_boxes_have_their_labels_and_defaults(panel):
    expected = {
        "showUncertaintyCheckBox": ("Show uncertainty as overlay", True),
        "sideBySideCheckBox": ("Show input and output side by side", True),
        "keepJobFilesCheckBox": ("Keep job files", False),
    }
    for name, (text, checked) in expected.items():
        box = child(panel, name)
        assert (box.text(), box.isChecked()) == (text, checked), name


def test_cache_folder_field_browses_for_folders(panel):
    assert child(panel, "cacheDirLineEdit").filters == ctkPathLineEdit.Filter.Dirs
    assert child(panel, "cacheDirLabel").text()


def test_models_section_lists_models_in_a_read_only_single_row_table(panel):
    table = child(panel, "modelsTableWidget")
    headers = [table.horizontalHeaderItem(i).text() for i in range(table.columnCount())]
    assert headers == ["Model", "Version", "Status", "Size"]
    assert table.selectionBehavior() == QAbstractItemView.SelectionBehavior.SelectRows
    assert table.selectionMode() == QAbstractItemView.SelectionMode.SingleSelection
    assert table.editTriggers() == QAbstractItemView.EditTrigger.NoEditTriggers
    buttons = {name: child(panel, name).text() for name in
               ("downloadModelButton", "importModelButton", "openCacheFolderButton", "deleteModelButton")}
    assert buttons == {"downloadModelButton": "Download", "importModelButton": "Import weights…",
                       "openCacheFolderButton": "Open cache folder", "deleteModelButton": "Delete"}
    progress = child(panel, "modelsProgressBar")
    assert (progress.minimum(), progress.maximum()) == (0, 1000)
    assert not progress.isVisibleTo(panel), "shown only while a download runs"
    assert table.isVisibleTo(panel)


def test_run_area_starts_idle_and_ends_with_a_spacer(panel):
    apply = child(panel, "applyButton")
    assert apply.text() == "Apply" and not apply.isEnabled() and apply.toolTip()
    progress = child(panel, "progressBar")
    assert (progress.minimum(), progress.maximum(), progress.isTextVisible()) == (0, 1000, True)
    assert child(panel, "statusLabel").wordWrap()
    log = child(panel, "statusLog")
    assert log.isReadOnly() and log.maximumBlockCount() == 2000
    layout = panel.layout()
    last = layout.itemAt(layout.count() - 1).spacerItem()
    assert last is not None and last.expandingDirections() & Qt.Orientation.Vertical


# --------------------------------------------------------------------------------------------
# Against the module's Python


def test_every_ui_attribute_the_module_uses_exists(tree):
    names = set(widget_classes(tree))
    used, patterns = set(), []
    tree_ast = module_ast()
    loops = {}  # loop variable -> the literal strings it iterates over
    for node in ast.walk(tree_ast):
        if (isinstance(node, ast.For) and isinstance(node.target, ast.Name)
                and isinstance(node.iter, (ast.Tuple, ast.List))):
            loops[node.target.id] = [e.value for e in node.iter.elts if isinstance(e, ast.Constant)]
    for node in ast.walk(tree_ast):
        if isinstance(node, ast.Attribute) and is_self_ui(node.value):
            used.add(node.attr)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
              and node.args and is_self_ui(node.args[0])):
            key = node.args[1]
            if isinstance(key, ast.Constant):
                used.add(key.value)
            elif isinstance(key, ast.Name):
                used.update(loops.get(key.id, []))
            elif isinstance(key, ast.JoinedStr):  # getattr(self.ui, f"inputVolume{slot}Selector")
                parts = [re.escape(v.value) if isinstance(v, ast.Constant) else r"\w+" for v in key.values]
                patterns.append("".join(parts))
    assert len(used) > 20, "the scan found almost no self.ui attributes: has the module changed shape?"
    assert not used - names, f"used in {MODULE_FILE.name} but missing from the .ui: {sorted(used - names)}"
    for pattern in patterns:
        assert any(re.fullmatch(pattern, n) for n in names), f"no widget matches getattr(self.ui, /{pattern}/)"


def test_bound_widgets_name_parameter_node_fields(tree, panel):
    in_xml = {}
    for widget in tree.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                assert prop.get("stdset") == "0", "a dynamic property, as Designer writes it"
                in_xml[widget.get("name")] = prop.findtext("string")
    assert in_xml == PARAMETER_NAMES
    for name, field in PARAMETER_NAMES.items():
        assert child(panel, name).property("SlicerParameterName") == field
    node_class = next(n for n in module_ast().body
                      if isinstance(n, ast.ClassDef) and n.name == "ScoreFusionParameterNode")
    fields = {s.target.id for s in node_class.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
    missing = set(PARAMETER_NAMES.values()) - fields
    assert not missing, f"SlicerParameterName values that are not ScoreFusionParameterNode fields: {sorted(missing)}"


# --------------------------------------------------------------------------------------------
# The screenshot


EXAMPLE_CARD = (
    "<h3>T1w → FLAIR synthesis (demonstration, simulated contrasts)</h3>"
    "<table><tr><td><b>Task</b></td><td>Synthesize contrast</td></tr>"
    "<tr><td><b>Inputs</b></td><td>T1w</td></tr><tr><td><b>Output</b></td><td>FLAIR</td></tr>"
    "<tr><td><b>Licence</b></td><td>MIT</td></tr><tr><td><b>Status</b></td><td>installed</td></tr></table>"
    "<p><i>Outside the data a model was trained on a generative model can produce plausible-looking but "
    "wrong structures. Outputs are AI-generated images for research, not for diagnosis.</i></p>"
)
EXAMPLE_MODELS = [  # as the module fills the table: title, version, status, size
    ("T1w super-resolution ×4 isotropic (demonstration)", "1.0.0", "embedded", "5.4 MB"),
    ("T1w thick-slice ×4 → thin axial slices (demonstration)", "1.0.0", "embedded", "3.7 MB"),
    ("T1w → FLAIR synthesis (demonstration, simulated contrasts)", "1.0.0", "installed", "5.4 MB"),
    ("T1w + T2w → FLAIR synthesis (demonstration, simulated contrasts)", "1.0.0", "embedded", "3.7 MB"),
]


def fill_with_example(panel):
    """What the panel shows mid-run of a T1w -> FLAIR synthesis, every section open."""
    child(panel, "taskComboBox").setCurrentIndex(1)
    child(panel, "targetContrastComboBox").addItem("FLAIR")  # the module shows contrast titles
    child(panel, "modelComboBox").addItem("t1-to-flair — T1w → FLAIR synthesis (demonstration)")
    child(panel, "modelCardBrowser").setHtml(EXAMPLE_CARD)
    child(panel, "presetComboBox").addItems(["Default (DDPM, 20 steps)"])
    child(panel, "deviceComboBox").addItems(["Auto", "CPU"])
    child(panel, "inputVolume1Label").setText("T1w:")
    inputs = child(panel, "inputVolume1Selector")
    inputs.addItem("MRBrainTumor1 T1")
    inputs.setCurrentIndex(1)
    for slot in (2, 3):  # this model needs one contrast; the module hides the other slots
        child(panel, f"inputVolume{slot}Label").hide()
        child(panel, f"inputVolume{slot}Selector").hide()
    table = child(panel, "modelsTableWidget")
    table.setRowCount(len(EXAMPLE_MODELS))
    for row, values in enumerate(EXAMPLE_MODELS):
        for column, text in enumerate(values):
            table.setItem(row, column, QTableWidgetItem(text))
    table.selectRow(2)
    for name in SECTION_TITLES:
        child(panel, name).collapsed = False
    apply = child(panel, "applyButton")
    apply.setText("Cancel")
    apply.setEnabled(True)
    child(panel, "progressBar").setValue(600)
    child(panel, "statusLabel").setText("Synthesizing FLAIR: step 12 of 20 (sagittal, coronal and axial planes fused)")
    child(panel, "statusLog").setPlainText(
        "Job started: t1-to-flair v1.0.0 on CPU, method score-fusion, seed 0\n"
        "Input T1w: 182 x 218 x 182 voxels, 1.0 mm\n"
        "Sampling: DDPM, 20 steps"
    )


def test_screenshot_of_the_filled_panel(app):
    panel, _ = load_panel(app)
    fill_with_example(panel)
    height = panel.sizeHint().height()
    panel.resize(SCREENSHOT_WIDTH, height)
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    picture = panel.grab()
    assert picture.save(str(ARTIFACT), "PNG")
    if os.environ.get("SCOREFUSION_UPDATE_SCREENSHOT") == "1":
        CATALOG_SCREENSHOT.parent.mkdir(exist_ok=True)
        assert picture.save(str(CATALOG_SCREENSHOT), "PNG")
    with Image.open(ARTIFACT) as image:
        scale = picture.devicePixelRatio()
        assert image.size == (round(SCREENSHOT_WIDTH * scale), round(height * scale))
        grey = np.asarray(image.convert("L"), dtype=float)
    assert grey.std() > 10, "the screenshot is blank"
    assert len(np.unique(grey)) > 50, "the screenshot has no text or widgets in it"
