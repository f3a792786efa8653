"""The reconstruction database: every prunable layer pruned and reconstructed at every
level of a sparsity grid, stored compactly, stitched into a model on demand.

    from spdy.database import build_database, Database

    db = build_database(bundle, "db/", method="obs")   # resumable
    db = Database.open("db/")
    db.check_compatible(bundle)                         # ProfileMismatchError otherwise
    db.errors                                           # [layers, levels] relative errors
    db.stitch(model, {"encoder.layer.0.output.dense": 12})

See :mod:`spdy.database.reconstruction` for the methods, :mod:`spdy.database.encoding`
for the storage format and :mod:`spdy.database.store` for the directory layout.
"""

from spdy.database.hessian import HessianStats, capture_hessians
from spdy.database.reconstruction import METHODS, Reconstruction, reconstruct, relative_errors
from spdy.database.store import SCHEMA_VERSION, Database, build_database

__all__ = [
    "METHODS",
    "SCHEMA_VERSION",
    "Database",
    "HessianStats",
    "Reconstruction",
    "build_database",
    "capture_hessians",
    "reconstruct",
    "relative_errors",
]
