"""fracture-node: models."""
