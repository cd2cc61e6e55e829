"""Training the bundled demo model (dev only: needs torch; see scripts/train_demo_model.py)."""
