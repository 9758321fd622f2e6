"""Secure model families, one module each (encoders: BERT, RoBERTa, DistilBERT)."""
