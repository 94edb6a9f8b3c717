"""Orchestration for the Noisy Student pipeline: config, round loop, Ray driver, storage, CLI."""
