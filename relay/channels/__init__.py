"""Channel adapters, one module per provider."""
