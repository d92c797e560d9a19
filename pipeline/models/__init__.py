"""The AST tagger and CLAP embedder (callable classes for Ray actors or plain use) and their device and
precision handling. Shared by the tagging job and by query encoding."""
