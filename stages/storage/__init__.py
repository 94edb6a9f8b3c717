"""The bottom floor: files on a local folder or an object store (``files``), every path of a run (``layout``), and
the one way an artifact says what made it and whether it is whole (``artifacts``)."""
