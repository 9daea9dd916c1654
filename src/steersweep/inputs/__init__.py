"""Stage 1, what goes in: dataset files read into records (our JSONL, CAA JSON, plain text) and
the prompts, pairs and behaviour items made from them (datasets), and prompts turned into token ids
(encoding)."""
