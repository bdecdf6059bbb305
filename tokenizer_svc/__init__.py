"""The tokenizer stage: text <-> token ids, chat templates, streaming detokenization."""
