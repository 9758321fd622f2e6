"""mpc_lm: run Hugging Face transformer models on secret-shared weights and text.

Parties (a model owner, data owners, optional compute parties and a dealer)
run as separate processes; CrypTen secret-shares the weights and the token ids
among them so that no single party sees the text, the weights or the outputs
it is not entitled to. Start with ``mpc-lm launch CONFIG`` or read README.md.
"""

__version__ = "0.1.0"
