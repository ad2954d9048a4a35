"""fracture-node: node."""
