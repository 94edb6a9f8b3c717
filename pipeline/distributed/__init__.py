"""The Ray edges: each ``stages/`` function run across the cluster, and nothing else.

``runtime`` (``ray.init``, task fan-out with progress, error unwrapping), ``data_check`` (per-shard data checks as
Ray tasks), ``train`` (Ray Train ``TorchTrainer`` around ``stages.train.train_model``), ``pseudo_label`` (Ray Data
actor pool around ``stages.pseudo_label.ShardLabeler``), ``select`` (selection passes as Ray tasks), ``folder``
(``prepare-folder``'s shards as Ray tasks), ``tune`` (the recipe search on Ray Tune).
"""
