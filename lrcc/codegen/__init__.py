"""Code generation: lower an lrcc Graph to something that runs."""
