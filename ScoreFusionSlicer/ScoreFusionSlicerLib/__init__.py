"""Qt-free helpers of the ScoreFusion Slicer module (standard library only at import time)."""
