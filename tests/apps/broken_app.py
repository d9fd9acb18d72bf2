"""An application module whose import fails."""

raise RuntimeError("this app cannot start")
