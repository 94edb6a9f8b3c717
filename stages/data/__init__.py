"""Data and shards: WebDataset reading and writing (``shards``), the training stream (``loader``), compact training
shards (``compact``), the built-in digits and the folder converter, labeled-split scans, the contamination guard's
per-shard scan, and test-set corruptions."""
