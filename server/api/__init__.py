"""HTTP side: one module per wire format, its schemas and its event writer."""
