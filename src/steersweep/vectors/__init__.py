"""Stage 3, steering directions: computed from contrast pairs (directions), held and written as
safetensors or read from other tools' files (vectorset), and exported to llama.cpp control vectors
(exchange)."""
