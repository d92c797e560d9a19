"""Audio in, features out: reading bytes (storage), decoding and resampling (decode), deterministic
windows, and the exact AST and CLAP features. Shared by the tagging job and by query encoding."""
