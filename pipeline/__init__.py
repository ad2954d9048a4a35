"""fracture-node: pipeline."""
