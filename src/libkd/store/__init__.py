"""Teacher-logit store: augmentation-consistent records, compressed, fingerprinted, resumable."""

from libkd.store.codec import decode, encode, record_dtype
from libkd.store.format import LogitStore, StoreError, ViewsNotHeld, read_manifest

__all__ = ["LogitStore", "StoreError", "ViewsNotHeld", "decode", "encode", "read_manifest", "record_dtype"]
