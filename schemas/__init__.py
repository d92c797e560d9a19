"""Output table schemas, declared once and enforced at write time."""

from schemas.tables import (
    SCHEMA_VERSION,
    WIDTH_KEY,
    SchemaError,
    clips_schema,
    fixed_width,
    segments_schema,
    stored_schema,
    validate_table,
    vector_widths,
)

__all__ = ["SCHEMA_VERSION", "WIDTH_KEY", "SchemaError", "clips_schema", "fixed_width", "segments_schema",
           "stored_schema", "validate_table", "vector_widths"]
