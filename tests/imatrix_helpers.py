"""The imatrix fixture writer lives in quant/fixtures/imatrix_files.py (bench/recipes.py
uses it too); re-exported here for the tests."""

from swan_serve.quant.fixtures.imatrix_files import (  # noqa: F401
    TEXT,
    Sums,
    record_sums,
    write_dat,
    write_gguf,
)
