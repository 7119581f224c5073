"""Image sets kept in the stack's object store: manifests, push, list, pull into a cache.

``plantml data push DIR s3://BUCKET/PREFIX`` stores a set; ``plantml train --data-dir
s3://BUCKET/PREFIX`` trains from it (downloaded once per content digest, every file
checked), and every run records the set it trained on as an MLflow dataset input.
"""

from plantml.datasets.listing import SetListing, list_sets
from plantml.datasets.manifest import MANIFEST_NAME, FileEntry, Manifest, build_manifest, content_digest
from plantml.datasets.remote import PullResult, PushResult, S3Location, is_s3_uri, pull, push, read_manifest

__all__ = [
    "MANIFEST_NAME", "FileEntry", "Manifest", "PullResult", "PushResult", "S3Location", "SetListing", "build_manifest", "content_digest",
    "is_s3_uri", "list_sets", "pull", "push", "read_manifest",
]
