"""`lora-analysis study`: seven questions beyond Section 7, answered with error bars (issue 13)."""

from .config import StudyConfig, TargetSetting
from .types import Answer, StudyRunsView, StudyVerdict

__all__ = ["Answer", "StudyConfig", "StudyRunsView", "StudyVerdict", "TargetSetting"]
