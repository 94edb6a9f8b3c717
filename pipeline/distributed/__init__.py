"""The Ray edges, and nothing else: ``runtime`` (``ray.init``, and the one-line error a Ray wrapper hides),
``executor`` (the one choice of where a run's work runs, and the Ray executor: tasks, a Ray Data actor pool, Ray
Train), ``tune`` (the recipe search on Ray Tune). The stages themselves live in ``stages/`` and run on whichever
executor the run chose."""
