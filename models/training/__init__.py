"""Training and evaluation of the fracture-node models (never imported at run time)."""
