"""Rule node implementations, one module per node type."""
