"""trainbig_jax: train big, then compress."""
