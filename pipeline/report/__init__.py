"""The run report: ``page`` (report.html, ``compare``), ``data`` (reading a run's files), ``plots`` (matplotlib
figures as PNG bytes), ``tensorboard`` (event files), ``check`` (headless-Chromium check of a built page).

Everything here reads a run's files through ``stages.storage.files``; nothing trains or runs Ray.
"""


class ReportError(ValueError):
    """A run that cannot be reported: missing folder, no finished round. The message says what to do."""
