"""PySide6 stand-ins for the Slicer and CTK widgets of ``Resources/UI/ScoreFusion.ui``.

QUiLoader replaces an unknown custom class by its declared base and keeps unknown properties only as
dynamic ones, so nothing checks that a value fits the real widget. Registered with
``QUiLoader.registerCustomWidget``, these classes (named exactly like Slicer's) declare the real
widgets' properties, so ranges, titles and flags are applied and can be read back as Slicer would.
"""

from __future__ import annotations

import enum
import warnings

from PySide6.QtCore import Property, QFlag, Signal, Slot
from PySide6.QtWidgets import QComboBox, QGroupBox, QLineEdit, QTextBrowser, QWidget


def _stored(name: str, kind, convert=None, then=None) -> Property:
    """A Qt property kept in ``self._<name>``; ``then(self)`` runs after every change."""

    def get(self):
        return getattr(self, f"_{name}")

    def set(self, value):
        setattr(self, f"_{name}", convert(value) if convert else value)
        if then is not None:
            then(self)

    return Property(kind, get, set)


class qMRMLWidget(QWidget):
    """The module panel's root; Slicer emits ``mrmlSceneChanged`` when the panel gets its scene."""

    mrmlSceneChanged = Signal("vtkMRMLScene*")


class ctkCollapsibleButton(QGroupBox):
    """A section: ``text`` is its title; ``collapsed`` is only recorded (screenshots show sections open)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self._collapsed = False

    def _text(self):
        return self.title()

    def _setText(self, text):
        self.setTitle(text)

    text = Property(str, _text, _setText)
    collapsed = _stored("collapsed", bool)


class qMRMLNodeComboBox(QComboBox):
    """A node selector without a scene: a "none" item shows ``noneDisplay`` while ``noneEnabled`` is set."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self._nodeTypes: list[str] = []
        self._showChildNodeTypes = True
        self._noneEnabled = False
        self._addEnabled = True
        self._removeEnabled = True
        self._renameEnabled = False
        self._noneDisplay = "None"
        self._baseName = ""
        self._hasNoneItem = False
        self.mrmlScene = None

    def _syncNoneItem(self):
        """Keep item 0 the "none" entry, labelled ``noneDisplay``, exactly while ``noneEnabled`` is set."""
        if self._noneEnabled and not self._hasNoneItem:
            self.insertItem(0, self._noneDisplay)
        elif self._hasNoneItem and not self._noneEnabled:
            self.removeItem(0)
        elif self._hasNoneItem:
            self.setItemText(0, self._noneDisplay)
        self._hasNoneItem = self._noneEnabled

    @Slot("vtkMRMLScene*")
    def setMRMLScene(self, scene):
        self.mrmlScene = scene

    nodeTypes = _stored("nodeTypes", "QStringList", convert=list)
    showChildNodeTypes = _stored("showChildNodeTypes", bool)
    noneEnabled = _stored("noneEnabled", bool, then=_syncNoneItem)
    addEnabled = _stored("addEnabled", bool)
    removeEnabled = _stored("removeEnabled", bool)
    renameEnabled = _stored("renameEnabled", bool)
    noneDisplay = _stored("noneDisplay", str, then=_syncNoneItem)
    baseName = _stored("baseName", str)


class ctkFittedTextBrowser(QTextBrowser):
    """CTK's text browser that grows to fit its text; a plain QTextBrowser is enough offscreen."""


# PySide6 warns that it cannot add a property typed by an enum of the class being built, then adds
# it once the enum is registered (the property below is a flag type, which the test checks).
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "libpyside: QMetaObjectBuilder", RuntimeWarning)

    class ctkPathLineEdit(QLineEdit):
        """A path field; ``filters`` is a flag type so ``<set>ctkPathLineEdit::Dirs</set>`` resolves."""

        @QFlag
        class Filter(enum.Flag):
            # CTK's values, which mirror QDir::Filter.
            Dirs = 0x001
            Files = 0x002
            Drives = 0x004
            NoSymLinks = 0x008
            Readable = 0x010
            Writable = 0x020
            Executable = 0x040
            NoDotAndDotDot = 0x1000

        def __init__(self, parent=None):
            super().__init__(parent)
            F = self.Filter  # CTK's default: all entries, readable, without . and ..
            self._filters = F.Dirs | F.Files | F.Drives | F.NoDotAndDotDot | F.Readable

        filters = _stored("filters", "ctkPathLineEdit::Filter")


SLICER_STUBS = (qMRMLWidget, ctkCollapsibleButton, qMRMLNodeComboBox, ctkFittedTextBrowser, ctkPathLineEdit)
