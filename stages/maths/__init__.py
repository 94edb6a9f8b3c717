"""Pure functions over arrays and numbers: which pseudo-labels to keep (``selection``), when to stop and which round
is best (``stopping``), the recipe-search knobs (``tuning``), the validation carve (``validation``)."""
