"""Output table schemas, declared once and enforced at write time."""

from schemas.tables import (
    SCHEMA_VERSION,
    SchemaError,
    clips_schema,
    segments_schema,
    validate_table,
)

__all__ = ["SCHEMA_VERSION", "SchemaError", "clips_schema", "segments_schema", "validate_table"]
