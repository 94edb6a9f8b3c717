"""The cluster client: ``jobs`` (submit, status, logs, stop a Ray Job), ``run_store`` (read a run from its storage:
``rounds``, ``download``, ``publish``). Runs on a laptop or the head node; talks to Ray only through the Jobs API.
"""
