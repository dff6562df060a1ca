"""The wds store format: WebDataset tar shards (the registry's "wds" row loads `store`).

store (the backend: writer and reader of tar shards, members checked against the manifest),
bounds (caps on what a member may claim, checked before reading it), decode (handlers for
plain `webdataset`, re-exported as `enspipe.stores.wds_decoders`). Import the module you need.
"""
__all__: list[str] = []
