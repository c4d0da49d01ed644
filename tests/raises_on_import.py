"""A module whose import fails with something other than ImportError (for the settings checks)."""

raise RuntimeError("this module cannot be imported")
